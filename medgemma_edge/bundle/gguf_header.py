"""A small, defensive GGUF header reader: metadata and tensor extents, checked before any native loader.

llama.cpp trusts its input; reading the header ourselves first turns a truncated or foreign file into
a clear error, and gives the runtime facts (e.g. the mmproj's projection width) without the `gguf`
package, which only the conversion extra installs.
ref: GGUF v3 layout, llama.cpp ggml/src/gguf.cpp.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from medgemma_edge.errors import UserError
from medgemma_edge.fsutil import regular_file_size

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml type -> (block size, bytes per block), for the types our bundles contain.
_TYPE_SIZES = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
               10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292)}
_MAX_COUNT = 1 << 24  # no real header has more entries than this; a larger count means garbage


@dataclass(frozen=True)
class LongArray:
    """A metadata array of more than 64 items (the vocabulary, its scores): read past, only its length kept."""

    length: int


@dataclass(frozen=True)
class TensorInfo:
    dims: tuple[int, ...]  # GGUF order: innermost (row length) first
    type: int  # ggml type id

    @property
    def block(self) -> int | None:
        """Elements per block of this type, None for a type this reader does not know."""
        return _TYPE_SIZES[self.type][0] if self.type in _TYPE_SIZES else None


@dataclass(frozen=True)
class GgufHeader:
    metadata: dict[str, Any]
    n_tensors: int
    data_end: int  # bytes the file must have to hold every tensor
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise UserError(f"{self.path}: GGUF header is truncated; the file is incomplete, copy or convert it again")
        return struct.unpack(fmt, raw)[0]

    def count(self, min_item_bytes: int = 1) -> int:
        n = self.unpack("<Q")
        if n > _MAX_COUNT:
            raise UserError(f"{self.path}: GGUF header is corrupt (count {n}); convert the model again")
        if n * min_item_bytes > self.size - self.f.tell():  # never read (or allocate) past the end of the file
            raise UserError(f"{self.path}: GGUF header is truncated; the file is incomplete, copy or convert it again")
        return n

    def string(self) -> str:
        raw = self.f.read(self.count())
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            sub = self.unpack("<I")
            if sub not in _SCALARS and sub != _STRING:  # nested arrays: llama.cpp refuses them, and no recursion
                raise UserError(f"{self.path}: GGUF header has invalid array type {sub}; the file is corrupt")
            n = self.count(struct.calcsize(_SCALARS[sub]) if sub in _SCALARS else 8)
            if sub in _SCALARS and n > 64:  # skip big numeric arrays (token scores, types) cheaply
                self.f.seek(n * struct.calcsize(_SCALARS[sub]), 1)
                return LongArray(n)
            items = [self.value(sub) for _ in range(n)]
            return items if n <= 64 else LongArray(n)  # the 262k-token vocabulary is read past, not kept
        raise UserError(f"{self.path}: GGUF header has unknown value type {vtype}; the file is corrupt")


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse metadata (arrays of more than 64 items are read past: LongArray) and tensor infos, and check
    that the data fits the file."""
    size = regular_file_size(path)
    if size is None:
        what = "is a folder" if path.is_dir() else "does not exist" if not path.exists() else "is not a regular file"
        raise UserError(f"{path}: {what}; pass a .gguf file produced by `medgemma-edge convert`")
    try:
        with path.open("rb") as f:
            r = _Reader(f, path, size)
            if f.read(4) != b"GGUF":
                raise UserError(f"{path}: not a GGUF file (bad magic); pass a .gguf produced by `medgemma-edge convert`")
            version = r.unpack("<I")
            if version not in (2, 3):
                raise UserError(f"{path}: GGUF version {version} is not supported (expected 3)")
            n_tensors, n_kv = r.count(24), r.count(12)  # smallest tensor info / key-value pair in bytes
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string()
                meta[key] = r.value(r.unpack("<I"))
            ends = []
            tensors: dict[str, TensorInfo] = {}
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.unpack("<I")
                if n_dims > 4:  # GGML_MAX_DIMS, as llama.cpp checks
                    raise UserError(f"{path}: GGUF tensor has {n_dims} dimensions (at most 4); the file is corrupt")
                dims = [r.unpack("<Q") for _ in range(n_dims)]
                ttype, offset = r.unpack("<I"), r.unpack("<Q")
                block, nbytes = _TYPE_SIZES.get(ttype, (1, 0))
                n = 1
                for d in dims:
                    n *= d
                ends.append(offset + n // block * nbytes)
                tensors[name] = TensorInfo(tuple(dims), ttype)
            align = meta.get("general.alignment", 32)
            if type(align) is not int or align <= 0 or align & (align - 1):  # as llama.cpp: a power of 2
                raise UserError(f"{path}: GGUF general.alignment {align!r} is not a power of 2; the file is corrupt")
            data_start = -(-f.tell() // align) * align
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror}); check the path and permissions") from exc
    data_end = data_start + max(ends, default=0)
    if size < data_end:
        raise UserError(f"{path}: GGUF is truncated ({size} of {data_end} bytes); copy or convert it again")
    return GgufHeader(meta, n_tensors, data_end, tensors)
