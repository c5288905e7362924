"""Generated sample images for the demo, benchmarks and validation: no patient data anywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def sample_image(path: Path, size: tuple[int, int] = (480, 400), seed: int = 0) -> Path:
    """A grayscale PA-chest-like film: two dark lung fields, a bright mediastinum, film grain."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    lungs = sum(np.exp(-(((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2)) for cx in (0.3, 0.7))
    grain = np.random.default_rng(seed).normal(0, 6, (h, w))
    gray = np.clip(210 - 150 * lungs + grain, 0, 255).astype(np.uint8)
    Image.fromarray(gray, mode="L").save(path)
    return path


# The questions the demo, bench, validate and the parity tests ask about sample images.
SYSTEM = "You are an expert radiologist."
PROMPT = "Describe this X-ray"
FOLLOWUP = "Is there anything abnormal?"
