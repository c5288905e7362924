"""The slices of a volume as the model sees them: windowed per modality, through Google's image transport,
stretched to the encoder's square like any image.

Google's two sources differ, so each is a named preset (`WINDOWINGS`, default "notebook"):
- "notebook" (google-health/medgemma notebooks/high_dimensional_ct_hugging_face.ipynb, cells 47z6cTSkTTTS,
  iTu1nQneLEvM, h57n3PWsznxy): HU = slope * stored + intercept (float, not rounded); per channel
  clip(HU, lo, hi) -> float32 -> (x - lo) / (hi - lo) * 255, windows R -1024..1024, G -135..215, B 0..80 HU;
  np.round -> uint8; each slice sent as a JPEG of PIL's default quality 75.
- "serving" (python/data_accessors/local_file_handlers/generic_dicom_handler.py, RGBWindow of
  TraditionalWindow(0, 2048), (175, 80), (40, 80); serving/predictor.py _encode_image_bytes): HU rounded to
  integers; np.round(np.interp(clip(HU, lo, hi), (lo, hi), (0, 255))), windows R -1024..1024, G 135..215,
  B 0..80 HU; zero-padded to a square, then a JPEG of quality 95 (PIL here, OpenCV there).
MR and other volumes, in both: one min..max over all slices given to the model, not per slice
(ref: generic_dicom_handler.py _process_buffered_mri_volume): round((x - min) / (max - min) * 255), all 255
when constant; grey copied to RGB. We apply the modality LUT first (identical for a positive rescale slope,
and it keeps slices with different per-slice rescale comparable) and invert MONOCHROME1.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.dicom import _FIX_CORRUPT, _decode, _quiet_pydicom, _read
from medgemma_edge.inputs.images import resize_square
from medgemma_edge.inputs.studies import Slice
from medgemma_edge.inputs.volumes import Volume

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Windowing:
    name: str
    ct_windows: tuple[tuple[float, float], ...]  # (lo, hi) HU for R, G, B
    round_hu: bool  # the serving code rounds HU to integers before windowing
    jpeg_quality: int | None  # the JPEG each slice travels as (None: lossless)
    pad_square: bool  # the serving code zero-pads to a square before the JPEG
    source: str


WINDOWINGS = {
    "notebook": Windowing("notebook", ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0)), False, 75, False,
                          "MedGemma 1.5 CT notebook: G -135..215 HU, JPEG quality 75"),
    "serving": Windowing("serving", ((-1024.0, 1024.0), (135.0, 215.0), (0.0, 80.0)), True, 95, True,
                         "MedGemma serving code: G 135..215 HU, zero-padded square, JPEG quality 95"),
}
DEFAULT_WINDOWING = "notebook"


@dataclass(frozen=True)
class RenderedSlice:
    label: str  # "SLICE n", as the prompt names it
    source: Slice
    image: Image.Image  # RGB, size x size: exactly what the encoder gets


def windowing(name: str) -> Windowing:
    if name not in WINDOWINGS:
        raise UserError(f"--windowing {name}: choose one of {', '.join(WINDOWINGS)}")
    return WINDOWINGS[name]


def ct_rgb(hu: np.ndarray, preset: Windowing) -> np.ndarray:
    """HU [H, W] -> uint8 [H, W, 3], one window per channel, exactly as the preset's source computes it."""
    out = np.empty((*hu.shape, 3), dtype=np.uint8)  # one float channel at a time: large slices stay bounded
    if preset.round_hu:
        hu = np.round(hu, 0)
    for c, (lo, hi) in enumerate(preset.ct_windows):
        if preset.round_hu:
            x = np.interp(np.clip(hu, lo, hi), (lo, hi), (0.0, 255.0))
        else:  # the notebook's `norm`: float32 after the clip, in place, in this order
            x = np.clip(hu, lo, hi).astype(np.float32)
            x -= np.float32(lo)
            x /= np.float32(hi - lo)
            x *= np.float32(255.0)
        out[..., c] = np.round(x, 0)
    return out


def series_gray(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """One slice of a min..max-normalised series -> uint8 [H, W] (all 255 when the series is constant)."""
    if not hi > lo:
        return np.full(values.shape, 255, dtype=np.uint8)
    x = (values.astype(np.float64) - lo) / (hi - lo) * 255.0
    return np.round(x, 0).astype(np.uint8)


def transport(rgb: np.ndarray, preset: Windowing) -> np.ndarray:
    """What the model receives after Google's transport: optional zero-padding to a square, then the JPEG."""
    if preset.pad_square and rgb.shape[0] != rgb.shape[1]:
        h, w = rgb.shape[:2]
        d = abs(h - w)
        pad = ((d // 2, d - d // 2), (0, 0), (0, 0)) if h < w else ((0, 0), (d // 2, d - d // 2), (0, 0))
        rgb = np.pad(rgb, pad)
    if preset.jpeg_quality is None:
        return rgb
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=preset.jpeg_quality)
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB"))


class _Reader:
    """Decodes slices, reading each file's header once (a multi-frame file holds many slices)."""

    def __init__(self) -> None:
        self._ds: dict[Path, Any] = {}

    def values(self, sl: Slice) -> tuple[np.ndarray, str]:
        """Modality-LUT values (HU for CT) of one slice as float64 [H, W], and its photometric interpretation."""
        from pydicom.pixels import apply_modality_lut

        ds = self._ds.get(sl.path)
        if ds is None:
            ds = self._ds[sl.path] = _read(sl.path, defer_size="64 KB")
        try:
            arr, photometric = _decode(sl.path, ds, sl.frame or 0)
            if arr.ndim != 2:
                raise UserError(f"{sl.name}: pixel shape {arr.shape} is not one grayscale slice; {_FIX_CORRUPT}")
            if sl.rescale is not None:  # an enhanced multi-frame file's own rescale for this frame
                values = arr.astype(np.float64) * sl.rescale[0] + sl.rescale[1]
            else:
                values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        except (UserError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # PHI: pydicom messages may quote tag values; report the type only
            raise UserError(f"{sl.name}: cannot read this slice ({type(exc).__name__}); {_FIX_CORRUPT}") from None
        return np.nan_to_num(values), photometric


def render_volume(volume: Volume, indices: Sequence[int], size: int,
                  preset: Windowing | str = DEFAULT_WINDOWING) -> list[RenderedSlice]:
    """The slices at `indices` of `volume`, labelled "SLICE 1".. in that order, each [size, size] RGB (size 0:
    as Google's transport delivers them, before the processor's resize).

    Each slice is decoded, windowed and resized one at a time, so memory holds only the small results.
    """
    preset = windowing(preset) if isinstance(preset, str) else preset
    chosen = [volume.slices[i] for i in indices]
    reader = _Reader()
    modality = volume.series.modality
    with _quiet_pydicom(chosen[0].path):
        lo = hi = 0.0
        if modality != "CT":  # the range of every slice the model gets: a first pass, nothing kept
            ranges = [(float(v.min()), float(v.max())) for v, _ in (reader.values(sl) for sl in chosen)]
            lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
            log.info("study: %s series range %.6g..%.6g over %d slices", modality, lo, hi, len(chosen))
        else:
            log.info("study: CT windows (HU) %s, preset %s", preset.ct_windows, preset.name)
        out = []
        for n, sl in enumerate(chosen, 1):
            values, photometric = reader.values(sl)
            if modality == "CT":
                rgb = ct_rgb(values, preset)
            else:
                gray = series_gray(values, lo, hi)
                if photometric == "MONOCHROME1":
                    gray = 255 - gray
                rgb = np.repeat(gray[..., None], 3, axis=-1)
            sent = transport(rgb, preset)
            pixels = resize_square(Image.fromarray(sent), size) if size else sent  # size 0: as sent, unresized
            out.append(RenderedSlice(f"SLICE {n}", sl, Image.fromarray(pixels)))
    return out


def save_slices(rendered: Sequence[RenderedSlice], volume: Volume, out_dir: Path) -> list[Path]:
    """Write SLICE_001.png.. (exactly the encoder's pixels, lossless) and slices.tsv (label, file, source file,
    frame, InstanceNumber, position along the normal in mm) into a new folder, published whole or not at all."""
    from medgemma_edge.fsutil import publishing_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: exists and is not an empty folder; choose a new -o folder for the slices")
    normal = volume.series.normal
    rows = ["label\tfile\tsource\tframe\tinstance\tposition_mm"]
    names = []
    try:
        with publishing_dir(out_dir) as tmp:
            for k, r in enumerate(rendered, 1):
                name = f"SLICE_{k:03d}.png"
                r.image.save(tmp / name, format="PNG")
                pos = (f"{float(np.dot(r.source.position, normal)):.3f}"
                       if normal is not None and r.source.position is not None else "")
                rows.append(f"{r.label}\t{name}\t{r.source.path}\t{'' if r.source.frame is None else r.source.frame}"
                            f"\t{'' if r.source.instance is None else r.source.instance}\t{pos}")
                names.append(out_dir / name)
            (tmp / "slices.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot write the slices ({exc.strerror or exc}); choose a writable -o") from exc
    return names
