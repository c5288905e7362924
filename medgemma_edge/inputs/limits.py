"""Every size a user can hand in, bounded before anything is allocated: pixels per image (PNG, JPEG, TIFF,
DICOM alike, decided from the header), DICOM frames, the square `render` writes, prompt bytes."""

from __future__ import annotations

from medgemma_edge.errors import UserError

# 8192 x 8192 = 67 MP: above the largest plausible single radiograph (full-field mammogram ~4096x5625,
# stitched full-spine/long-leg ~4300x12000) and a typical exported WSI region, which the model sees at
# 896x896 anyway. Kept below Pillow's default bomb warning (89.5 MP) so users meet our limit, not Pillow's.
MAX_SIDE = 8192
MAX_PIXELS = MAX_SIDE * MAX_SIDE
MAX_FRAMES = 4096  # a multi-frame DICOM (cine, tomosynthesis, an enhanced CT volume); one frame is decoded at a time
MAX_BITS = 64  # BitsAllocated of any DICOM pixel format
BYTES_PER_TOKEN = 64  # prompts longer than this many bytes per context token cannot fit: refused before tokenizing


def too_large(name: object, detail: str) -> UserError:
    return UserError(f"{name}: image too large, refused before decoding ({detail}); "
                     f"downscale or crop it below {MAX_SIDE}x{MAX_SIDE} pixels (the model sees 896x896 anyway)")


def check_pixels(name: object, width: int, height: int) -> None:
    """Refuse an empty image or one over MAX_PIXELS, from its declared size alone."""
    if width <= 0 or height <= 0:
        raise UserError(f"{name}: image has zero size ({width}x{height}); pass a non-empty image")
    if width * height > MAX_PIXELS:
        raise too_large(name, f"{width}x{height} = {width * height:,} pixels, limit {MAX_PIXELS:,}")
