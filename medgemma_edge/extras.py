"""Doorway from the runtime to `convert/`, which needs the `convert` extra (torch, transformers, gguf, ...).

The runtime itself never imports torch or transformers; only these entry points do, on demand.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from medgemma_edge.bundle import Bundle
from medgemma_edge.errors import UserError


def require_convert_extra() -> None:
    """Refuse, naming the install command, when the `convert` extra is missing; force hub clients offline."""
    # conversion runs offline too: any hub client transformers pulls in must never reach out
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[flag] = "1"
    # find_spec, not import: the runtime package itself never imports torch or transformers
    missing = [m for m in ("torch", "transformers", "gguf", "safetensors", "sentencepiece", "onnx")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"conversion needs the 'convert' extra ({missing[0]} is not installed): "
                        f"pip install torch==2.13.0 'medgemma-edge[convert]'")


def convert_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, gguf: list[str], mmproj: list[str] | None,
                       overwrite: bool = False, progress: bool = True, **onnx: Any) -> Bundle:
    """See convert.bundle_writer.convert_checkpoint (onnx: onnx_vision, onnx_decoder, calibration_images)."""
    require_convert_extra()
    from convert.bundle_writer import convert_checkpoint as _convert

    return _convert(checkpoint_dir, out_dir, gguf, mmproj, overwrite=overwrite, progress=progress, **onnx)


def synthesize(out_dir: str | Path, size: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    require_convert_extra()
    from convert.synth.checkpoint import synthesize as _synth

    return _synth(Path(out_dir), size=size, seed=seed, **overrides)
