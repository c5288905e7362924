"""`render`: what the model will see for an image, written as a PNG a radiologist can check."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from medgemma_edge.cli.app import EPILOG, cli
from medgemma_edge.errors import UserError


@cli.command(epilog=EPILOG)
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="PNG file to write.")
@click.option("--frame", type=click.IntRange(0), default=None, help="Frame of a multi-frame DICOM (default: the middle one).")
@click.option("--size", default=896, show_default=True, type=click.IntRange(0),
              help="Square side the encoder sees (MedGemma: 896); 0 keeps the rendered resolution.")
def render(image: Path, output: Path, frame: int | None, size: int) -> None:
    """Write exactly what the model will see for IMAGE (DICOM windowing, RGB, stretch to the square)."""
    from PIL import Image

    from medgemma_edge.inputs.images import check_image_path, load_image, resize_square, to_rgb

    check_image_path(image)
    pixels = resize_square(image, size, frame) if size else to_rgb(load_image(image, frame))
    try:
        Image.fromarray(np.asarray(pixels)).save(output, format="PNG")
    except OSError as exc:
        raise UserError(f"{output}: cannot write the PNG ({exc.strerror or exc}); choose a writable -o") from exc
    click.echo(f"wrote {output}")
