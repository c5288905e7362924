"""`render`: what the model will see for an image, written as a file a radiologist can check."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import click
import numpy as np

from medgemma_edge.cli.app import EPILOG, cli
from medgemma_edge.cli.options import whole
from medgemma_edge.cli.study import check, volume_options
from medgemma_edge.errors import UserError
from medgemma_edge.inputs.limits import MAX_FRAMES, MAX_PIXELS, MAX_SIDE

# what `-o` may end in, and the format written: the suffix always says what the bytes are
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}


@cli.command(epilog=EPILOG)
@click.argument("image", type=click.Path(path_type=Path), required=False)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="File to write: .png (lossless, recommended), .jpg or .tif; with --study, a new folder.")
@click.option("--frame", type=whole(0, MAX_FRAMES - 1), default=None,
              help="Frame of a multi-frame DICOM (default: the middle one).")
@click.option("--size", default=896, show_default=True, type=whole(0, MAX_SIDE),
              help=f"Square side the encoder sees (MedGemma: 896, at most {MAX_SIDE}); 0 keeps the rendered resolution.")
@volume_options
def render(image: Path | None, output: Path, frame: int | None, size: int, **study: Any) -> None:
    """Write exactly what the model will see for IMAGE (DICOM windowing, RGB, stretch to the square).

    With --study instead of IMAGE: the slices the model will see of a DICOM series, as SLICE_001.png...
    in a new folder -o, with slices.tsv (label, source file, InstanceNumber, position).
    """
    from PIL import Image

    if study["study"] is not None or image is None:
        render_study(image, output, frame, size, study)
        return
    check(study, [])

    from medgemma_edge.fsutil import atomic_write
    from medgemma_edge.inputs.dicom import is_dicom
    from medgemma_edge.inputs.images import check_image_path, load_image, resize_square, to_rgb
    from medgemma_edge.runtime import memory

    fmt = FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise UserError(f"{output}: unknown image suffix {output.suffix or '(none)'}; end -o with "
                        f"{', '.join(sorted(set(FORMATS)))}")
    check_image_path(image)
    if frame is not None and not is_dicom(image):
        raise UserError(f"{image}: --frame picks a frame of a multi-frame DICOM, and this is not DICOM; drop --frame")
    # the source is at most MAX_PIXELS (checked from its header); decoded RGBA plus the resized copy, twice over
    need = MAX_PIXELS * 4 + 2 * 3 * size * size
    memory.preflight({"image": need}, None, False, f"render {image}", fix="lower --size or free some memory")
    pixels = resize_square(image, size, frame) if size else to_rgb(load_image(image, frame))
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels)).save(buf, format=fmt)
    try:
        atomic_write(output, buf.getvalue())  # never a half-written file, even on a full disk
    except OSError as exc:
        raise UserError(f"{output}: cannot write the image ({exc.strerror or exc}); choose a writable -o") from exc
    click.echo(f"wrote {output}")


def render_study(image: Path | None, output: Path, frame: int | None, size: int, kw: dict[str, Any]) -> None:
    from medgemma_edge.inputs.slices import render_volume, save_slices
    from medgemma_edge.inputs.volumes import load_volume, sample_indices
    from medgemma_edge.runtime import memory

    if image is not None or frame is not None or kw["study"] is None:
        raise UserError("render takes IMAGE or --study PATH (and --frame only with IMAGE); pass one of them")
    _, volume = load_volume(kw["study"], kw["series"], kw["slice_order"])
    indices = sample_indices(len(volume.slices), kw["max_slices"])
    side = size or max(volume.slices[0].rows, volume.slices[0].cols)
    # every result kept (RGB at `side`), plus one slice being decoded and windowed in float64
    need = len(indices) * 3 * side * side + 8 * 4 * volume.slices[0].rows * volume.slices[0].cols
    memory.preflight({"slices": need}, None, False, f"render --study {kw['study']}", fix="lower --size or --max-slices")
    written = save_slices(render_volume(volume, indices, size, kw["windowing"]), volume, output)
    click.echo(f"wrote {len(written)} slices ({volume.series.modality} {volume.series.orientation}, "
               f"order {volume.order}, windowing {kw['windowing']}) and slices.tsv to {output}")
