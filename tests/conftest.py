"""Session fixtures: one tiny synthetic MedGemma checkpoint, its bundle, the transformers reference."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgemma_edge.convert_entry import convert_checkpoint, synthesize

ALL_GGUF = ["f32", "f16", "bf16", "q8_0", "q4_k_m", "q4_0"]
ALL_MMPROJ = ["f32", "f16", "q8_0"]
ALL_ONNX_VISION = ["fp32", "fp16", "int8"]
ALL_ONNX_DECODER = ["fp32", "int8", "int4"]
ENCODERS = [f"gguf:{p}" for p in ALL_MMPROJ] + [f"onnx:{p}" for p in ALL_ONNX_VISION]
DECODERS = [f"gguf:{p}" for p in ALL_GGUF] + [f"onnx:{p}" for p in ALL_ONNX_DECODER]


def linked_copy(src: Path, dst: Path, private: tuple[str, ...] = ()) -> Path:
    """A copy of a bundle or checkpoint folder that costs no disk: large files are hard links.

    The tiny bundle is about 2 GB (every precision of a 262k-row vocabulary), and CI's disk is shared.
    Small files (manifest, config) and the `private` names are real copies, so a test may rewrite
    them; a hard-linked file must only be replaced, never written in place.
    """
    def place(s: str, d: str) -> None:
        if os.path.getsize(s) < (1 << 20) or Path(s).name in private:
            shutil.copy2(s, d)
        else:
            os.link(s, d)

    return Path(shutil.copytree(src, dst, copy_function=place))


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
    from convert.reference import Reference

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
