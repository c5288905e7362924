"""Lazy, layout-agnostic access to the tensors of a Hugging Face checkpoint.

Names are normalised by the checkpoint's family (convert/registry.py) to canonical namespaces so the
writers never see prefixes: `text.<rest>` (Gemma 3 decoder), `vision.<rest>` (SigLIP), `projector.<rest>`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from convert.registry import Family, checkpoint_family
from medgemma_edge.errors import UserError
from medgemma_edge.fsutil import sha256_file


def canonical_name(name: str, family: Family) -> str | None:
    """The family's canonical name (`text.`, `vision.`, `projector.`) of a checkpoint tensor, or None
    for tensors the runtime has no place for."""
    for prefix, namespace in family.prefixes:
        if name.startswith(prefix):
            canon = namespace + name[len(prefix):]
            return None if canon.startswith(family.ignored) else canon
    return None if name.startswith(family.ignored) else name


class Checkpoint:
    """A checkpoint folder whose tensors are read one at a time, never all at once."""

    def __init__(self, directory: Path, family: Family | None = None) -> None:
        self.dir = directory
        self.family = family or checkpoint_family(directory)
        self._where: dict[str, tuple[Path, str]] = {}
        files = self._weight_files()
        try:
            from safetensors import safe_open

            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        canon = canonical_name(name, self.family)
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

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors names it: "BF16", "F16", "F32"."""
        from safetensors import safe_open

        file, key = self._where[name]
        with safe_open(str(file), framework="pt") as f:
            return str(f.get_slice(key).get_dtype())

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        file, key = self._where[name]
        with safe_open(str(file), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def _tensor(self, name: str) -> Any:
        """One tensor as torch loads it (bf16 has no numpy dtype); one-line errors for missing or truncated ones."""
        from safetensors import safe_open

        if name not in self._where:
            raise UserError(f"{self.dir}: tensor {name!r} is missing; the checkpoint is incomplete")
        file, key = self._where[name]
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as exc:  # noqa: BLE001 - a truncated shard fails here, as SafetensorError
            raise UserError(f"{file}: tensor {key!r} is unreadable ({str(exc)[:200]}); copy the checkpoint again") from exc

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy."""
        return self._tensor(name).float().numpy()

    def get_raw(self, name: str) -> np.ndarray:
        """One tensor's stored bits, uncopied: 16-bit types as uint16, others in their own dtype."""
        import torch

        t = self._tensor(name)
        return t.view(torch.int16).numpy().view(np.uint16) if t.element_size() == 2 else t.numpy()

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every file in the checkpoint folder, for the bundle's provenance."""
        return {p.name: sha256_file(p) for p in sorted(self.dir.iterdir()) if p.is_file()}


def iter_layers(names: list[str], prefix: str) -> Iterator[int]:
    """Distinct layer indices among names like `<prefix>.<i>.<rest>`."""
    seen = {int(n[len(prefix) + 1:].split(".", 1)[0]) for n in names if n.startswith(prefix + ".")}
    yield from sorted(seen)
