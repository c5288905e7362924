"""The bundle: a folder of artifacts plus `manifest.json`, the contract between conversion and runtime.

The manifest is the single source of truth for what each file is (kind, format, precision) and
what its bytes must hash to; nothing is ever parsed from file names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import stat
from pathlib import Path
from typing import Any

from medgemma_edge.bundle.artifacts import Artifact, parse_artifact
from medgemma_edge.errors import IntegrityError, UserError
from medgemma_edge.fsutil import atomic_write, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "medgemma-edge-bundle"
FORMAT_VERSION = 1


class Bundle:
    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.dir = directory
        self.manifest = manifest
        self.artifacts = [parse_artifact(a, directory / MANIFEST) for a in manifest["artifacts"]]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def has_vision(self) -> bool:
        """False for a text-only family (MedGemma 27B text): its manifest has no vision section."""
        return isinstance(self.config.get("vision"), dict)

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

    def vocab_artifact(self) -> Artifact:
        """The smallest GGUF decoder: its vocabulary tokenizes for every backend, and mtmd needs it."""
        ggufs = sorted((a for a in self.artifacts if a.kind == "decoder" and a.format == "gguf"), key=lambda a: a.size)
        if not ggufs:
            raise UserError(f"{self.dir}: no GGUF decoder to take the tokenizer from; convert with at least one "
                            f"--gguf precision")
        return ggufs[0]

    def check_files(self, artifacts: list[Artifact]) -> None:
        """Every file of these artifacts is a regular file of the size the manifest records: no hashing, so
        cheap enough for every load, and a FIFO or device in its place is refused before anything opens it."""
        for a in artifacts:
            for name, size, _ in a.files():
                path = self.dir / name
                try:
                    st = path.stat()
                except OSError:
                    raise IntegrityError(f"{path}: listed in {MANIFEST} but missing; re-run `medgemma-edge convert`") from None
                if not stat.S_ISREG(st.st_mode):
                    raise IntegrityError(f"{path}: is not a regular file (a pipe or device where an artifact should be); "
                                         f"re-run `medgemma-edge convert`")
                if st.st_size != size:
                    raise IntegrityError(f"{path}: {st.st_size} bytes where {MANIFEST} records {size} (modified or "
                                         f"truncated after conversion); re-run `medgemma-edge convert` to rebuild it")

    def verify(self, artifacts: list[Artifact] | None = None) -> None:
        """Re-hash artifacts and refuse any whose size or sha256 differs from the manifest."""
        chosen = artifacts if artifacts is not None else self.artifacts
        self.check_files(chosen)
        for a in chosen:
            for name, _, digest in a.files():
                if sha256_file(self.dir / name) != digest:
                    raise IntegrityError(
                        f"{self.dir / name}: sha256 does not match {MANIFEST} (the file was modified or truncated "
                        f"after conversion); re-run `medgemma-edge convert` to rebuild it"
                    )
                log.info("verified %s (%s)", name, digest[:12])


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


# What the runtime reads from the manifest's config summary, and the type each must have. The vision
# part (and tokens per image) only where the bundle has one: text-only families have none.
_TEXT_KEYS = {("eos_token_ids",): list,
              **{("text", k): int for k in ("hidden_size", "vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                             "intermediate_size", "sliding_window")}}
_VISION_KEYS = {("tokens_per_image",): int,
                **{("vision", k): int for k in ("image_size", "patch_size", "num_heads", "hidden_size", "num_layers")}}


def _check_config(config: dict[str, Any], path: Path) -> None:
    keys_needed = {**_TEXT_KEYS, **(_VISION_KEYS if config.get("vision") is not None else {})}
    for keys, kind in keys_needed.items():
        value: Any = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and not 0 < value < 1 << 40):
            raise UserError(f"{path}: config.{'.'.join(keys)} is missing or invalid; re-run `medgemma-edge convert`")
    eos = config["eos_token_ids"]
    vocab = config["text"]["vocab_size"]
    if not eos or not all(type(i) is int and 0 <= i < vocab for i in eos):
        raise UserError(f"{path}: config.eos_token_ids must list the token ids that end an answer (got {eos!r}); "
                        f"re-run `medgemma-edge convert`")


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Atomically: a reader sees the old manifest or the new one, never half of one."""
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
