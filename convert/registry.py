"""Model families by Hugging Face architecture string, as llama.cpp's converter registers them.

A family owns its config parsing (config.json -> spec, refusing what llama.cpp would compute
differently), its tensor-name prefixes and the tensors it ignores. Adding a family is adding one
module under convert/models/ that calls `register`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgemma_edge.errors import UserError


@dataclass(frozen=True)
class Family:
    architecture: str  # the `architectures` entry of config.json, e.g. "Gemma3ForConditionalGeneration"
    parse: Callable[[dict[str, Any], str, Path | None], Any]  # (config, source, checkpoint folder) -> spec
    # checkpoint name prefix -> canonical namespace ("text.", "vision.", "projector."), longest first
    prefixes: tuple[tuple[str, str], ...]
    ignored: tuple[str, ...]  # canonical names with no place in the runtime (tied LM head, unused heads)
    description: str


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.architecture] = family
    return family


def supported() -> list[str]:
    return sorted(_FAMILIES)  # filled by convert/models/, which convert/__init__.py imports


def family_for(cfg: dict[str, Any], source: str) -> Family:
    """The family of a config's `architectures`; refused naming the supported ones."""
    names = supported()
    archs = cfg.get("architectures") or []
    for arch in archs if isinstance(archs, list) else []:
        if arch in _FAMILIES:
            return _FAMILIES[arch]
    listed = "; ".join(f"{a} ({_FAMILIES[a].description})" for a in names)
    raise UserError(f"{source}: architectures {archs} is not supported; medgemma-edge converts {listed}")


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


def read_config(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: no config.json; pass a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable JSON ({exc}); re-download or re-create the checkpoint") from exc
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object; re-download or re-create the checkpoint")
    return cfg


def spec_from_config(cfg: dict[str, Any], source: str = "config.json", folder: Path | None = None) -> Any:
    """The spec of a config, parsed by the family its `architectures` names (side files read from `folder`)."""
    return family_for(cfg, source).parse(cfg, source, folder)


def load_spec(checkpoint_dir: Path) -> Any:
    """The checkpoint's spec, parsed by the family its config.json names."""
    return spec_from_config(read_config(checkpoint_dir), str(checkpoint_dir / "config.json"), checkpoint_dir)


def checkpoint_family(checkpoint_dir: Path) -> Family:
    return family_for(read_config(checkpoint_dir), str(checkpoint_dir / "config.json"))
