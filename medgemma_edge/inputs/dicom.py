"""DICOM file -> the 8-bit RGB image MedGemma sees (then `preprocess` resizes it like any PNG).

Rendering, by modality (all outputs are rounded with np.rint: round half to even, as MedGemma's
`window_accurate` does with np.round):
- projection radiography (CR, DX, MG, ...): modality LUT, then the first VOI LUT / window from the
  tags (PS3.3 C.11.2), else the full pixel range; MONOCHROME1 inverted after windowing; grey -> RGB.
- CT: Hounsfield units, three windows packed into R, G, B like MedGemma's serving code:
  R = -1024..1024 HU (wide), G = 135..215 HU, B = 0..80 HU (brain). Google's CT notebook writes
  -135..215 for G; the serving code (window centre 175, width 80) and its docstring ("135 HU (fat)
  to 215 HU") say 135..215, and we follow the serving code.
- MR and everything else: 0.5th..99.5th percentile of the frame -> 0..255.
- colour (RGB, YBR_*, PALETTE COLOR): converted to RGB, scaled to 8 bits when BitsStored > 8.

PHI: no tag value reaches a log record, an exception message or the prompt, except Modality,
BodyPartExamined and ViewPosition in `dicom_context` (only when they are valid Code Strings), the
modality, frame count and window values in logs, and standard enumerated values (photometric
interpretation, transfer syntax) in errors.
pydicom itself may quote tag values in its warnings, so those are silenced while we read.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.limits import MAX_BITS, MAX_FRAMES, check_pixels

log = logging.getLogger(__name__)

SUFFIXES = frozenset({".dcm", ".dicom"})
# ref: Google-Health/medgemma python/data_accessors/local_file_handlers/generic_dicom_handler.py,
# _MEDGEMMA_1_CT_DEFAULT_WINDOW = RGBWindow((0, 2048), (175, 80), (40, 80)) as (centre, width)
CT_WINDOWS_HU: tuple[tuple[float, float], ...] = ((-1024.0, 1024.0), (135.0, 215.0), (0.0, 80.0))
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RG", "RF", "XA"})
PERCENTILES = (0.5, 99.5)
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")  # ref: PS3.5 6.2, VR CS
# ref: PS3.3 C.7.6.3.1.2, the defined terms: only these may be quoted back in an error message
_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL",
                          "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB"})
_UID_CHARS = re.compile(r"[0-9.]{1,64}")  # ref: PS3.5 9.1
_HANDLERS = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"
_FIX_CORRUPT = "the file may be truncated or corrupt: export it again from the PACS or modality"
_REQUIRED = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PhotometricInterpretation")
_CONTEXT_FIELDS = (("Modality", "Modality"), ("BodyPartExamined", "Body part"), ("ViewPosition", "View"))


def is_dicom(path: Path) -> bool:
    """A `.dcm`/`.dicom` suffix, or the "DICM" magic after the 128-byte preamble (PS3.10 7.1)."""
    path = Path(path)
    if path.suffix.lower() in SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def render(path: Path, frame: int | None = None) -> Image.Image:
    """Render one frame (default: the middle one, n // 2) of a DICOM file as an 8-bit RGB image.

    CT is packed as R = -1024..1024 HU, G = 135..215 HU, B = 0..80 HU, following MedGemma's serving
    code (its CT notebook writes -135..215 for G). Raises UserError, and only UserError, on bad input.
    """
    path = Path(path)
    with _quiet_pydicom(path):
        try:
            return Image.fromarray(_render(path, frame))
        except (UserError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # PHI: pydicom messages may quote tag values; report the type only
            raise UserError(f"{path}: cannot render this DICOM image ({type(exc).__name__}); {_FIX_CORRUPT}") from None


def dicom_context(path: Path) -> str:
    """Opt-in prompt context, e.g. "Modality: CR. Body part: CHEST. View: PA." (missing fields omitted).

    Only these three Code String tags are read; a value that is not a valid Code String (free text,
    which may hold names) is dropped rather than passed to the model.
    """
    path = Path(path)
    with _quiet_pydicom(path):
        try:
            ds = _read(path, stop_before_pixels=True)
            parts = [f"{label}: {value}." for key, label in _CONTEXT_FIELDS if (value := _code_string(ds, key))]
        except (UserError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            raise UserError(f"{path}: cannot read DICOM tags ({type(exc).__name__}); {_FIX_CORRUPT}") from None
    return " ".join(parts)


def _import_pydicom_offline() -> None:
    """Import pydicom's pixel module without its test-data downloader: pydicom.pixels imports pydicom.data,
    whose optional `requests` pulls in urllib3, and urllib3 opens an IPv6 probe socket at import. Hiding
    requests for the duration keeps a DICOM read from creating any socket."""
    if "pydicom.pixels" in sys.modules:
        return
    hidden = [m for m in ("requests", "urllib3") if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None  # type: ignore[assignment]  # a None entry makes `import m` raise ImportError
    try:
        import pydicom.pixels  # noqa: F401
    finally:
        for m in hidden:
            if sys.modules.get(m) is None:
                del sys.modules[m]


@contextlib.contextmanager
def _quiet_pydicom(path: Path) -> Iterator[None]:
    """pydicom's validation warnings quote values ("Invalid value for VR PN: 'DOE^JOHN'"): drop them."""
    try:
        _import_pydicom_offline()  # also creates pydicom's child loggers, so they get the filter too
        from pydicom import config
    except ImportError as exc:  # import-time failure: the message names modules, never tag values
        if getattr(exc, "name", None) == "pydicom":
            raise UserError(f"{path}: reading DICOM needs pydicom; pip install 'pydicom>=3' {_HANDLERS}") from None
        raise UserError(f"{path}: DICOM support failed to import ({exc}); "
                        f"pip install --force-reinstall 'pydicom>=3' {_HANDLERS}") from None
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.split(".")[0] == "pydicom"]
    drop = logging.Filter("\0none")  # a name no record has: rejects every record
    old_mode = config.settings.reading_validation_mode
    for lg in loggers:
        lg.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config.settings.reading_validation_mode = config.IGNORE
            yield
    finally:
        config.settings.reading_validation_mode = old_mode
        for lg in loggers:
            lg.removeFilter(drop)


def _read(path: Path, **kw: Any) -> Any:
    import pydicom

    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a DICOM file; pass one DICOM file")
    if not path.is_file():
        raise UserError(f"{path}: DICOM file not found; check the path")
    try:
        # force: files without the 128-byte preamble (older exports) are still DICOM
        return pydicom.dcmread(path, force=True, **kw)
    except Exception as exc:
        raise UserError(f"{path}: not a readable DICOM file ({type(exc).__name__}); {_FIX_CORRUPT}") from None


def _code_string(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or not isinstance(value, str):  # multi-valued or binary: never shown
        return None
    value = value.strip()  # no upper(): lower-case free text (possibly a name) is not a Code String
    return value if _CODE_STRING.fullmatch(value) else None


def check_header(path: Path, ds: Any) -> int:
    """Refuse, from the header alone (no pixel decoded), what is not an image or would not fit: the same
    pixel limit as PNG/JPEG, at most MAX_FRAMES frames. Returns the frame count."""
    missing = [k for k in _REQUIRED if ds.get(k) in (None, "")]
    if missing:
        raise UserError(f"{path}: the image pixel module lacks {', '.join(missing)} (PS3.3 C.7.6.3); {_FIX_CORRUPT}")
    if str(ds.PhotometricInterpretation).strip() not in _PHOTOMETRIC:
        raise UserError(f"{path}: unsupported photometric interpretation (an unrecognised value); "
                        "convert the image to MONOCHROME2 or RGB (e.g. with dcmtk or gdcmconv)")
    try:
        n_frames = int(ds.get("NumberOfFrames") or 1)
        rows, cols, samples, bits = (int(ds.get(k)) for k in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated"))
    except (TypeError, ValueError):
        raise UserError(f"{path}: the image size tags (Rows, Columns, NumberOfFrames...) are not numbers; "
                        f"{_FIX_CORRUPT}") from None
    if n_frames < 1:
        raise UserError(f"{path}: NumberOfFrames is {n_frames}, so there is no image; {_FIX_CORRUPT}")
    check_pixels(path, cols, rows)
    if n_frames > MAX_FRAMES:
        raise UserError(f"{path}: {n_frames} frames, more than the {MAX_FRAMES} medgemma-edge reads; "
                        f"split the series or export the frames you need")
    if not 1 <= samples <= 4 or not 1 <= bits <= MAX_BITS:
        raise UserError(f"{path}: SamplesPerPixel {samples} / BitsAllocated {bits} is not an image format; "
                        f"{_FIX_CORRUPT}")
    return n_frames


def _render(path: Path, frame: int | None) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds = _read(path, defer_size="64 KB")  # large values (the pixel data) stay on disk until decoded
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UserError(f"{path}: no image pixel data (a report, RT plan or not a DICOM image); pass an image DICOM")
    n_frames = check_header(path, ds)  # decided from the header before any pixel is read or decoded
    index = n_frames // 2 if frame is None else frame
    if not 0 <= index < n_frames:
        raise UserError(f"{path}: frame {index} does not exist: the file has {n_frames} frame(s), "
                        f"numbered 0..{n_frames - 1}; pass a frame in that range")
    modality = _code_string(ds, "Modality") or "unknown"
    arr, photometric = _decode(path, ds, index)
    log.info("DICOM: modality %s, %d frame(s), rendering frame %d, pixels %s %s, %s",
             modality, n_frames, index, arr.shape, arr.dtype, photometric)
    if arr.size == 0:
        raise UserError(f"{path}: the image has zero size; {_FIX_CORRUPT}")

    if arr.ndim == 3 and arr.shape[-1] == 3:
        return _colour_to_u8(path, arr, photometric, int(ds.get("BitsStored") or arr.dtype.itemsize * 8))
    if arr.ndim == 2 and photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return _colour_to_u8(path, rgb, "RGB", rgb.dtype.itemsize * 8)
    if arr.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        shown = photometric if photometric in _PHOTOMETRIC else "(an unrecognised value)"
        raise UserError(f"{path}: unsupported photometric interpretation {shown} with pixel shape {arr.shape}; "
                        "convert the image to MONOCHROME2 or RGB (e.g. with dcmtk or gdcmconv)")

    values = np.nan_to_num(apply_modality_lut(arr, ds).astype(np.float64))  # HU for CT
    if modality == "CT":
        log.debug("DICOM: CT windows (HU) R %s G %s B %s", *CT_WINDOWS_HU)
        return np.stack([_scale(values, lo, hi) for lo, hi in CT_WINDOWS_HU], axis=-1)
    if modality in PROJECTION_MODALITIES:
        windowed, lo, hi = _voi(ds, values)
    else:
        windowed, (lo, hi) = values, np.percentile(values, PERCENTILES)
        log.debug("DICOM: percentile window %.6g..%.6g", lo, hi)
    gray = _scale(windowed, lo, hi)
    if photometric == "MONOCHROME1":  # low values are white: invert after windowing (PS3.3 C.7.6.3.1.2)
        gray = 255 - gray
    return np.repeat(gray[..., None], 3, axis=-1)


def _decode(path: Path, ds: Any, index: int) -> tuple[np.ndarray, str]:
    """Decode one frame with pydicom's handlers; returns the array and its photometric interpretation."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    tsuid = ds.file_meta.get("TransferSyntaxUID")
    if not tsuid:  # no file meta (forced read): use the encoding pydicom detected
        implicit, little = ds.original_encoding
        tsuid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta.TransferSyntaxUID = tsuid  # the decoder reads it from there
    tsuid = UID(str(tsuid))
    ts_name = tsuid.name if _UID_CHARS.fullmatch(str(tsuid)) else "an unknown transfer syntax"
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError:
        raise UserError(f"{path}: pydicom has no decoder for transfer syntax {ts_name}; convert the file to an "
                        "uncompressed transfer syntax first (e.g. gdcmconv --raw in.dcm out.dcm)") from None
    if not decoder.is_available:
        raise UserError(f"{path}: pixel data is compressed as {ts_name} and no decoder for it is installed; "
                        f"{_install_hint(tsuid)}")
    try:
        arr, meta = decoder.as_array(ds, index=index)  # as_rgb (default): YBR_FULL/_422 -> RGB
    except (UserError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # the Rust decoders (pylibjpeg-rle) panic with a BaseException on bad data
        raise UserError(f"{path}: cannot decode frame {index} of the {ts_name} pixel data "
                        f"({type(exc).__name__}); {_FIX_CORRUPT}") from None
    photometric = str(meta.get("photometric_interpretation") or ds.get("PhotometricInterpretation") or "").strip()
    return arr, photometric


def _install_hint(tsuid: str) -> str:
    from pydicom import uid

    if tsuid in uid.JPEG2000TransferSyntaxes:  # JPEG 2000 and HTJ2K
        return "pip install pylibjpeg pylibjpeg-openjpeg"
    if tsuid in uid.JPEGTransferSyntaxes or tsuid in uid.JPEGLSTransferSyntaxes:
        return "pip install pylibjpeg pylibjpeg-libjpeg"
    if tsuid in uid.RLETransferSyntaxes:
        return "pip install pylibjpeg pylibjpeg-rle"
    return "pip install python-gdcm"


def _voi(ds: Any, values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """VOI LUT Sequence or the first WindowCenter/WindowWidth, with its output range; else min..max."""
    from pydicom.pixels import apply_voi, apply_voi_lut, apply_windowing

    seq = ds.get("VOILUTSequence")
    has_lut = bool(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut or has_window:
        try:
            out = apply_voi_lut(np.rint(values).astype(np.int64) if has_lut else values, ds, index=0)
            if has_lut:  # the LUT's own output range (12-bit data in 16-bit LUTs is common)
                n_entries, first = int(seq[0].LUTDescriptor[0]) or 65536, int(seq[0].LUTDescriptor[1])
                entries = apply_voi(np.arange(first, first + n_entries, dtype=np.int64), ds, index=0)
                lo, hi = float(entries.min()), float(entries.max())
                log.debug("DICOM: VOI LUT, %d entries, output %.6g..%.6g", n_entries, lo, hi)
            else:
                # pydicom's own output for the values below and above the window: its y_min, y_max
                lo, hi = (float(v) for v in apply_windowing(np.array([-np.inf, np.inf]), ds, index=0))
                centre, width = (ds[k].value[0] if ds[k].VM > 1 else ds[k].value for k in ("WindowCenter", "WindowWidth"))
                log.debug("DICOM: window centre %.6g width %.6g (%s)", float(centre), float(width),
                         "first of several" if ds["WindowCenter"].VM > 1 else "from the tags")
            return out, lo, hi
        except Exception as exc:  # e.g. width < 1: still show the image, with the full range
            log.warning("DICOM: invalid VOI LUT/window tags (%s); using the full pixel range", type(exc).__name__)
    lo, hi = float(values.min()), float(values.max())
    log.debug("DICOM: no VOI tags; full pixel range %.6g..%.6g", lo, hi)
    return values, lo, hi


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to [lo, hi], map linearly to 0..255, round half to even (np.rint) -> uint8."""
    if not hi > lo:  # constant image, or a degenerate window
        return np.zeros(values.shape, dtype=np.uint8)
    x = (np.clip(values.astype(np.float64), lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(x).astype(np.uint8)


def _colour_to_u8(path: Path, arr: np.ndarray, photometric: str, bits: int) -> np.ndarray:
    from pydicom.pixels import convert_color_space

    if photometric in ("YBR_FULL", "YBR_FULL_422"):  # pydicom 3 converts these already; kept for other handlers
        arr = convert_color_space(arr, photometric, "RGB")
    elif photometric != "RGB":
        shown = photometric if photometric in _PHOTOMETRIC else "(an unrecognised value)"
        raise UserError(f"{path}: unsupported colour photometric interpretation {shown}; "
                        "convert the image to RGB (e.g. with dcmtk or gdcmconv)")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    x = arr.astype(np.float64)
    if bits > 8:
        x *= 255.0 / (2.0 ** min(bits, 64) - 1)
    return np.rint(np.clip(x, 0, 255)).astype(np.uint8)
