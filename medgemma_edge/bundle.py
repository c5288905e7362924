"""The bundle: a folder of artifacts plus `manifest.json`, the contract between conversion and runtime.

The manifest is the single source of truth for what each file is (kind, format, precision) and
what its bytes must hash to; nothing is ever parsed from file names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgemma_edge.errors import IntegrityError, UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "medgemma-edge-bundle"
FORMAT_VERSION = 1
KINDS = ("decoder", "encoder")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    kind: str  # "decoder" | "encoder"
    format: str  # "gguf" | "onnx"
    precision: str  # "f32", "f16", "q8_0", "q4_k_m", ...
    file: str
    size: int
    sha256: str
    recipe: dict[str, Any]
    # files the main one needs beside it (ONNX external weights): {"file", "size", "sha256"} each
    extra_files: tuple[dict[str, Any], ...] = ()

    @property
    def id(self) -> str:
        """What `load(encoder=..., decoder=...)` and the CLI call this artifact: `gguf:q4_k_m`."""
        return f"{self.format}:{self.precision}"

    def files(self) -> list[tuple[str, int, str]]:
        """(file, size, sha256) of every file this artifact consists of."""
        return [(self.file, self.size, self.sha256)] + [(e["file"], e["size"], e["sha256"]) for e in self.extra_files]

    @property
    def total_size(self) -> int:
        """Bytes of all its files: ONNX weights may sit in a .data file beside the graph."""
        return sum(size for _, size, _ in self.files())

    def to_json(self) -> dict[str, Any]:
        out = {
            "kind": self.kind, "format": self.format, "precision": self.precision, "file": self.file,
            "size": self.size, "sha256": self.sha256, "recipe": self.recipe,
        }
        if self.extra_files:
            out["extra_files"] = list(self.extra_files)
        return out


class Bundle:
    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.dir = directory
        self.manifest = manifest
        self.artifacts = [_artifact(a, directory) for a in manifest["artifacts"]]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256((self.dir / MANIFEST).read_bytes()).hexdigest()

    def path(self, artifact: Artifact) -> Path:
        return self.dir / artifact.file

    def find(self, kind: str, artifact_id: str) -> Artifact:
        for a in self.artifacts:
            if a.kind == kind and a.id == artifact_id:
                return a
        have = ", ".join(a.id for a in self.artifacts if a.kind == kind) or "none"
        raise UserError(
            f"{self.dir / MANIFEST}: no {kind} artifact {artifact_id!r} (this bundle has: {have}); "
            f"pick one of those or re-run `medgemma-edge convert` with that precision"
        )

    def verify(self, artifacts: list[Artifact] | None = None) -> None:
        """Re-hash artifacts and refuse any whose size or sha256 differs from the manifest."""
        for a in artifacts if artifacts is not None else self.artifacts:
            for name, size, digest in a.files():
                path = self.dir / name
                if not path.is_file():
                    raise IntegrityError(f"{path}: listed in {MANIFEST} but missing; re-run `medgemma-edge convert`")
                if path.stat().st_size != size or sha256_file(path) != digest:
                    raise IntegrityError(
                        f"{path}: sha256 does not match {MANIFEST} (the file was modified or truncated "
                        f"after conversion); re-run `medgemma-edge convert` to rebuild it"
                    )
                log.info("verified %s (%s)", name, digest[:12])


def _artifact(entry: Any, directory: Path) -> Artifact:
    try:
        a = Artifact(
            kind=str(entry["kind"]), format=str(entry["format"]), precision=str(entry["precision"]),
            file=str(entry["file"]), size=int(entry["size"]), sha256=str(entry["sha256"]),
            recipe=dict(entry.get("recipe") or {}),
            extra_files=tuple({"file": str(e["file"]), "size": int(e["size"]), "sha256": str(e["sha256"])}
                              for e in entry.get("extra_files") or ()),
        )
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:  # OverflowError: "size": Infinity
        raise UserError(f"{directory / MANIFEST}: malformed artifact entry ({exc!r}); re-run `medgemma-edge convert`") from exc
    if a.kind not in KINDS or any(name in ("", ".", "..") or Path(name).name != name for name, _, _ in a.files()):
        raise UserError(f"{directory / MANIFEST}: invalid artifact entry {a.file!r}; re-run `medgemma-edge convert`")
    return a


def open_bundle(directory: str | Path) -> Bundle:
    """Read and validate a bundle's manifest (without hashing artifacts)."""
    d = Path(directory)
    path = d / MANIFEST
    if d.exists() and not d.is_dir():
        raise UserError(f"{d}: is a file, not a bundle folder; pass the folder `medgemma-edge convert` wrote")
    if not d.is_dir():
        raise UserError(f"{d}: bundle folder not found; create one with `medgemma-edge convert CHECKPOINT -o {d}`")
    if not path.is_file():
        raise UserError(
            f"{d}: no {MANIFEST}, so this is not a finished bundle (an interrupted conversion leaves none); "
            f"re-run `medgemma-edge convert`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: deeply nested JSON
        raise UserError(f"{path}: unreadable manifest ({exc}); re-run `medgemma-edge convert`") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a medgemma-edge manifest; re-run `medgemma-edge convert`")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: bundle format version {manifest.get('format_version')!r}, this medgemma-edge reads "
            f"{FORMAT_VERSION}; convert again with this version"
        )
    if not isinstance(manifest.get("artifacts"), list) or not isinstance(manifest.get("config"), dict):
        raise UserError(f"{path}: manifest lacks artifacts or config; re-run `medgemma-edge convert`")
    _check_config(manifest["config"], path)
    return Bundle(d, manifest)


# What the runtime reads from the manifest's config summary, and the type each must have.
_CONFIG_KEYS = {("tokens_per_image",): int, ("eos_token_ids",): list,
                **{("text", k): int for k in ("hidden_size", "vocab_size", "num_layers", "num_kv_heads", "head_dim",
                                               "intermediate_size", "sliding_window")},
                **{("vision", k): int for k in ("image_size", "patch_size", "num_heads", "hidden_size", "num_layers")}}


def _check_config(config: dict[str, Any], path: Path) -> None:
    for keys, kind in _CONFIG_KEYS.items():
        value: Any = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and not 0 < value < 1 << 40):
            raise UserError(f"{path}: config.{'.'.join(keys)} is missing or invalid; re-run `medgemma-edge convert`")


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """temp + fsync + os.replace: a reader sees the old manifest or the new one, never half of one."""
    tmp = directory / f".{MANIFEST}.partial-{os.getpid()}"
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
