"""Our numpy/Pillow preprocessing against transformers' Gemma3 image processor, on awkward inputs.

Tolerance 1e-6: both resize the uint8 image with Pillow's bilinear filter (so the resized pixels
are identical) and differ only in the order of float32 rescale/normalise operations (~1 ulp of 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgemma_edge.inputs.images import pixel_values, resize_square


def _images(tmp: Path) -> dict[str, Path]:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (150, 110, 3), dtype=np.uint8)
    cases = {
        "rgb_nonsquare_down": Image.fromarray(rgb),
        "rgb_small_up": Image.fromarray(rgb[:20, :30]),
        "gray": Image.fromarray(rgb[..., 0]),
        "rgba": Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (150, 110), dtype=np.uint8)])),
        "palette": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "exact_size": Image.fromarray(rgb[:64, :64]),
    }
    paths = {}
    for name, img in cases.items():
        paths[name] = tmp / f"{name}.png"
        img.save(paths[name])
    return paths


@pytest.fixture(scope="module")
def hf_image_processor(tiny_ckpt: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_ckpt).image_processor


@pytest.mark.parametrize("case", ["rgb_nonsquare_down", "rgb_small_up", "gray", "rgba", "palette", "exact_size"])
def test_matches_transformers(hf_image_processor, tmp_path: Path, case: str) -> None:
    path = _images(tmp_path)[case]
    size = hf_image_processor.size["height"]
    ref = np.asarray(hf_image_processor(images=Image.open(path), return_tensors="np")["pixel_values"])[0]
    ours = pixel_values(path, size)
    assert ours.shape == ref.shape == (3, size, size)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_stretches_instead_of_letterboxing(tmp_path: Path) -> None:
    """A wide image must fill the whole square (HF stretches); llama.cpp's letterbox would pad rows."""
    wide = np.full((20, 200, 3), 255, dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = resize_square(tmp_path / "wide.png", 64)
    assert out.shape == (64, 64, 3) and (out == 255).all()
