"""One artifact of a bundle: what the manifest says a file is, and what its bytes must hash to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgemma_edge.errors import UserError

KINDS = ("decoder", "encoder")


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


def parse_artifact(entry: Any, manifest: Path) -> Artifact:
    """One manifest entry, refusing malformed ones and file names that would leave the bundle folder."""
    try:
        a = Artifact(
            kind=str(entry["kind"]), format=str(entry["format"]), precision=str(entry["precision"]),
            file=str(entry["file"]), size=int(entry["size"]), sha256=str(entry["sha256"]),
            recipe=dict(entry.get("recipe") or {}),
            extra_files=tuple({"file": str(e["file"]), "size": int(e["size"]), "sha256": str(e["sha256"])}
                              for e in entry.get("extra_files") or ()),
        )
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:  # OverflowError: "size": Infinity
        raise UserError(f"{manifest}: malformed artifact entry ({exc!r}); re-run `medgemma-edge convert`") from exc
    if a.kind not in KINDS or any(name in ("", ".", "..") or Path(name).name != name for name, _, _ in a.files()):
        raise UserError(f"{manifest}: invalid artifact entry {a.file!r}; re-run `medgemma-edge convert`")
    return a
