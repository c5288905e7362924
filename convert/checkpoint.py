"""Lazy, layout-agnostic access to the tensors of a Hugging Face MedGemma checkpoint.

Names are normalised to three canonical namespaces so the converters never see prefixes:
`text.<rest>` (Gemma 3 decoder), `vision.<rest>` (SigLIP), `projector.<rest>`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_edge.bundle import sha256_file
from medgemma_edge.errors import UserError


# Ordered longest-first: the published layout (transformers 4.50), then what newer versions save.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.model.", "text."),
    ("language_model.model.", "text."),
    ("model.language_model.", "text."),
    ("language_model.", "text."),
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
)
# Tensors with no place in the runtime: the LM head (Gemma 3 ties it to the embedding; llama.cpp
# writes none) and SigLIP's unused pooling head. Matched on canonical names.
_IGNORED = ("lm_head.", "text.lm_head.", "vision.head.")


def canonical_name(name: str) -> str | None:
    for prefix, namespace in _PREFIXES:
        if name.startswith(prefix):
            canon = namespace + name[len(prefix):]
            return None if canon.startswith(_IGNORED) else canon
    return None if name.startswith(_IGNORED) else name


class Checkpoint:
    """A checkpoint folder whose tensors are read one at a time, never all at once."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._where: dict[str, tuple[Path, str]] = {}
        files = self._weight_files()
        try:
            from safetensors import safe_open

            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        canon = canonical_name(name)
                        if canon is not None:
                            self._where[canon] = (file, name)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError (an Exception)
            raise UserError(f"{self.dir}: unreadable safetensors ({str(exc)[:200]}); the checkpoint is corrupt or "
                            f"incomplete, copy it again") from exc
        unknown = sorted(n for n in self._where if not n.startswith(("text.", "vision.", "projector.")))
        if unknown:
            raise UserError(f"{self.dir}: unexpected tensor names such as {unknown[0]!r}; not a MedGemma layout")

    def _weight_files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as exc:
                raise UserError(f"{index}: malformed shard index ({exc})") from exc
            files = [self.dir / s for s in shards]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{index}: shard {missing[0]} is missing; copy the whole checkpoint folder")
            return files
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            if any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt")):
                raise UserError(f"{self.dir}: only pickle weights (*.bin/*.pt) found; medgemma-edge reads safetensors only")
            raise UserError(f"{self.dir}: no *.safetensors weights found; pass a Hugging Face checkpoint folder")
        return files

    def names(self, namespace: str) -> list[str]:
        return sorted(n for n in self._where if n.startswith(namespace + "."))

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        file, key = self._where[name]
        with safe_open(str(file), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy (bf16 has no numpy dtype, so go through torch)."""
        from safetensors import safe_open

        if name not in self._where:
            raise UserError(f"{self.dir}: tensor {name!r} is missing; the checkpoint is incomplete")
        file, key = self._where[name]
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(key).float().numpy()
        except Exception as exc:  # noqa: BLE001 - a truncated shard fails here, as SafetensorError
            raise UserError(f"{file}: tensor {key!r} is unreadable ({str(exc)[:200]}); copy the checkpoint again") from exc

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every file in the checkpoint folder, for the bundle's provenance."""
        return {p.name: sha256_file(p) for p in sorted(self.dir.iterdir()) if p.is_file()}


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON side file ({} if absent), with a one-line error when it is malformed."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: malformed JSON ({exc}); copy the checkpoint again") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; copy the checkpoint again")
    return data


def iter_layers(names: list[str], prefix: str) -> Iterator[int]:
    """Distinct layer indices among names like `<prefix>.<i>.<rest>`."""
    seen = {int(n[len(prefix) + 1:].split(".", 1)[0]) for n in names if n.startswith(prefix + ".")}
    yield from sorted(seen)
