"""Pan-and-scan: a high-resolution image as the original plus crops along its long side, exactly as
transformers' Gemma3ImageProcessor does with `do_pan_and_scan=True`; each of them is then stretched to
the encoder's square like any image.

ref: transformers models/gemma3/image_processing_pil_gemma3.py, Gemma3ImageProcessorPil.pan_and_scan, and the
defaults of Gemma3Processor.images_kwargs (MedGemma's preprocessor_config.json leaves them null).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from medgemma_edge.inputs.images import ImageInput, load_image, to_rgb


@dataclass(frozen=True)
class PanAndScan:
    min_crop_size: int = 256  # pan_and_scan_min_crop_size
    max_num_crops: int = 4  # pan_and_scan_max_num_crops
    min_ratio_to_activate: float = 1.2  # pan_and_scan_min_ratio_to_activate


def crop_grid(width: int, height: int, params: PanAndScan = PanAndScan()) -> tuple[int, int, int, int]:
    """(crops across, crops down, crop width, crop height); (0, 0, 0, 0) when the image is not cropped."""
    if width >= height:  # square or landscape
        if width / height < params.min_ratio_to_activate:
            return 0, 0, 0, 0
        n_w = int(math.floor(width / height + 0.5))  # half rounds up
        n_w = min(int(math.floor(width / params.min_crop_size)), n_w)
        n_w, n_h = min(params.max_num_crops, max(2, n_w)), 1
    else:  # portrait
        if height / width < params.min_ratio_to_activate:
            return 0, 0, 0, 0
        n_h = int(math.floor(height / width + 0.5))
        n_h = min(int(math.floor(height / params.min_crop_size)), n_h)
        n_w, n_h = 1, min(params.max_num_crops, max(2, n_h))
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < params.min_crop_size:  # crops too small to help
        return 0, 0, 0, 0
    return n_w, n_h, crop_w, crop_h


def crops(image: Image.Image, params: PanAndScan = PanAndScan()) -> list[Image.Image]:
    """The crops of an RGB image, row by row; the last ones stop at the edge (array slicing, no padding)."""
    n_w, n_h, crop_w, crop_h = crop_grid(image.width, image.height, params)
    pixels = np.asarray(image)
    return [Image.fromarray(np.ascontiguousarray(pixels[top:top + crop_h, left:left + crop_w]))
            for top in (crop_h * i for i in range(n_h)) for left in (crop_w * j for j in range(n_w))]


def pan_and_scan(image: ImageInput, params: PanAndScan = PanAndScan(), frame: int | None = None) -> list[Image.Image]:
    """[the original RGB image, crop 1, ...]: what transformers encodes for one image with pan-and-scan on."""
    rgb = to_rgb(load_image(image, frame))
    return [rgb, *crops(rgb, params)]
