"""Image loading and preprocessing equal to Hugging Face's `Gemma3ImageProcessor` (no pan-and-scan).

ref: transformers Gemma3ImageProcessor: convert_rgb -> resize to size x size with PIL bilinear
(aspect ratio NOT kept) -> rescale 1/255 -> normalize (x - mean) / std -> channels first.

Input rules (every file is either handled as below or refused with a one-line `UserError`):
- Orientation: the EXIF Orientation tag is applied (`ImageOps.exif_transpose`), as transformers'
  `load_image` does; a radiograph shown rotated or mirrored swaps left and right.
- Size: more than `MAX_PIXELS` is refused from the header, before any pixel is decoded, and so is
  anything Pillow flags as a decompression bomb (its warning and its error alike).
- Transparency is composited onto white, exactly as transformers' `convert_to_rgb`.
- 16-bit grayscale (modes I;16*, and I and F read on the same 0..65535 scale) keeps its high byte:
  v8 = clip(v, 0, 65535) >> 8. transformers would call Pillow's convert("RGB"), which clips every
  value above 255 to white and so destroys a 16-bit radiograph; stretching each image by its own
  min..max would make the same stored value a different gray in every file. The fixed shift is
  linear, content-independent, and what Pillow itself does when it decodes 16-bit RGB or LA PNGs.
  12-bit data stored in 16 bits comes out dark (0..15): window it first (the DICOM path does).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Sequence
from typing import Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medgemma_edge.inputs.dicom import is_dicom
from medgemma_edge.errors import UserError
from medgemma_edge.fsutil import regular_file_size
from medgemma_edge.inputs.limits import check_pixels, too_large

log = logging.getLogger(__name__)

ImageInput = Union[str, Path, Image.Image]

# Pillow's own bomb check still applies on top of ours when a caller lowers Image.MAX_IMAGE_PIXELS.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")  # found in folders by name; DICOM by content
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_BOMBS = (Image.DecompressionBombWarning, Image.DecompressionBombError)


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not an image file; pass one image file per --image")
    if not path.exists():
        raise UserError(f"{path}: image file not found; check the path")
    if regular_file_size(path) is None:  # a pipe or device would block or never end
        raise UserError(f"{path}: is not a regular file (a pipe or device); pass an image file")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()).rstrip(".") or type(exc).__name__


@contextmanager
def _pillow(name: object, problem: str) -> Iterator[None]:
    """Run Pillow on untrusted bytes: a bomb warning refuses, any failure becomes `problem`, and its other
    warnings (corrupt EXIF, odd TIFF tags) become one log line naming the file instead of a printed warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except _BOMBS as exc:
            raise too_large(name, _one_line(exc)) from exc
        except UnidentifiedImageError as exc:
            raise UserError(f"{name}: not a readable image (unknown format, or a corrupt or zero-size header); "
                            f"pass a PNG, JPEG or TIFF file") from exc
        except Exception as exc:  # fuzzing found TypeError, not only OSError/SyntaxError/ValueError, from mutated TIFFs
            raise UserError(f"{name}: {problem} ({_one_line(exc)}); re-export the image") from exc
        finally:
            for w in caught:
                log.warning("%s: %s", name, _one_line(w.message))


def _open(path: Path) -> Image.Image:
    """Read the header only (Image.open is lazy) and refuse non-images and absurd dimensions."""
    with _pillow(path, "corrupt image header"):
        img = Image.open(path)
    try:
        _check_size(img, path)
    except UserError:
        img.close()
        raise
    return img


def _check_size(img: Image.Image, name: object) -> None:
    check_pixels(name, *img.size)


def check_image_path(path: Path) -> None:
    """Refuse a missing, non-image or oversized file from its header alone: milliseconds, no pixels decoded."""
    _check_file(path)
    if not is_dicom(path):  # DICOM is rendered by inputs.dicom, not Pillow: don't refuse it here
        _open(path).close()


def load_image(image: ImageInput, frame: int | None = None) -> Image.Image:
    """Decoded, upright image in its own mode; one-line `UserError` on bad input.

    DICOM files (by suffix or the DICM magic) are rendered as the model should see them (see
    dicom.py; `frame` picks one of a multi-frame file, default the middle one). A PIL image passed
    in gets the same size limit and EXIF orientation as a file (as transformers' `load_image`
    treats both), so a path and `Image.open(path)` give the same pixels."""
    if isinstance(image, Image.Image):
        return _decode(image, getattr(image, "filename", "") or f"image ({image.mode} {image.width}x{image.height})")
    path = Path(image)
    _check_file(path)
    if is_dicom(path):
        from medgemma_edge.inputs.dicom import render

        rendered = render(path, frame)
        _check_size(rendered, path)
        return rendered
    with _open(path) as img:  # closes the file; the decoded copy below stays valid
        return _decode(img, path)


def _decode(img: Image.Image, name: object) -> Image.Image:
    _check_size(img, name)  # again for PIL images handed in, which never went through _open
    # n_frames parses every later TIFF directory: fuzzing found corrupt ones raising TypeError and warning there
    with _pillow(name, "corrupt image directory"):
        frames = getattr(img, "n_frames", 1)
    if frames > 1:  # an animated GIF/PNG or a multi-page TIFF: say which one the model sees
        log.warning("%s: %d frames; the model sees the first (save the frame you mean as its own image)", name, frames)
    with _pillow(name, "corrupt or truncated image"):
        img.load()
        return ImageOps.exif_transpose(img)  # what transformers' load_image does for files


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit gray -> 8-bit L (or LA when a tRNS key marks a transparent value): v8 = clip(v, 0, 65535) >> 8."""
    a = np.asarray(img)
    v = np.clip(np.nan_to_num(a, nan=0.0) if a.dtype.kind == "f" else a, 0, 65535).astype(np.uint16)
    gray = (v >> 8).astype(np.uint8)
    if v.max() < 4096:  # 12-bit (or less) data in a 16-bit file: nearly black after the shift
        log.warning("16-bit image peaks at %d of 65535 and comes out nearly black; window it to the full range", v.max())
    key = img.info.get("transparency")
    if isinstance(key, (int, float)):  # 16-bit tRNS key: the one fully transparent gray value
        return Image.fromarray(np.dstack([gray, np.where(a == key, 0, 255).astype(np.uint8)]))
    return Image.fromarray(gray)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every mode Pillow decodes; see the module docstring for 16-bit and transparency rules."""
    if img.mode in HIGH_DEPTH_MODES:
        img = _high_depth_to_8bit(img)
    # ref: transformers image_transforms.convert_to_rgb: any alpha band or transparency key -> composite on white
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as exc:  # e.g. premultiplied "La": no conversion path in Pillow
        raise UserError(f"image mode {img.mode}: cannot convert to RGB ({_one_line(exc)}); "
                        f"save the image as an 8-bit RGB or grayscale PNG") from exc


def resize_square(image: ImageInput, size: int, frame: int | None = None) -> np.ndarray:
    """RGB uint8 [size, size, 3]: what the encoder sees, before rescaling and normalisation."""
    img = to_rgb(load_image(image, frame))
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def normalise(images: np.ndarray, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5) -> np.ndarray:
    """[n, S, S, 3] uint8 -> [n, 3, S, S] float32: rescale 1/255, then (x - mean) / std per channel.

    ref: transformers Gemma3ImageProcessor (rescale_factor 1/255, image_mean/image_std from
    preprocessor_config.json, 0.5 for every Gemma 3 checkpoint published so far), channels first.
    """
    x = images.astype(np.float32) * np.float32(1 / 255)
    m = np.asarray(mean, dtype=np.float32).reshape(-1)
    s = np.asarray(std, dtype=np.float32).reshape(-1)
    return np.ascontiguousarray(((x - m) / s).transpose(0, 3, 1, 2))


def pixel_values(image: ImageInput, size: int, mean: float | Sequence[float] = 0.5,
                 std: float | Sequence[float] = 0.5) -> np.ndarray:
    """Normalised float32 [3, size, size], the tensor HF's processor feeds the vision tower."""
    return normalise(resize_square(image, size)[None], mean, std)[0]
