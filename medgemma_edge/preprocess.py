"""Image loading and preprocessing equal to Hugging Face's `Gemma3ImageProcessor` (no pan-and-scan).

ref: transformers Gemma3ImageProcessor: convert_rgb -> resize to size x size with PIL bilinear
(aspect ratio NOT kept) -> rescale 1/255 -> normalize (x - mean) / std -> channels first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from medgemma_edge.errors import UserError

log = logging.getLogger(__name__)

ImageInput = Union[str, Path, Image.Image]


def check_image_path(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not an image file; pass one image file per --image")
    if not path.is_file():
        raise UserError(f"{path}: image file not found; check the path")


def load_image(image: ImageInput) -> Image.Image:
    """Open an image file (or pass a PIL image through) with a one-line error on bad input."""
    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    check_image_path(path)
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: not a readable image ({type(exc).__name__}); pass a PNG or JPEG file") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"{path}: corrupt or truncated image ({exc}); re-export the image") from exc
    if img.width == 0 or img.height == 0:
        raise UserError(f"{path}: image has zero size; re-export the image")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    # ref: transformers image_transforms.convert_to_rgb: transparency is composited onto white
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_square(image: ImageInput, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]: what the encoder sees, before rescaling and normalisation."""
    img = to_rgb(load_image(image))
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def pixel_values(image: ImageInput, size: int, mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """Normalised float32 [3, size, size], the tensor HF's processor feeds the vision tower."""
    x = resize_square(image, size).astype(np.float32) * np.float32(1 / 255)
    return ((x - mean) / std).transpose(2, 0, 1).copy()
