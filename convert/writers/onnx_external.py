"""Initializers written straight into an ONNX external-data file, one tensor (or one chunk) at a time.

The graph proto only holds a stub per large tensor (name, type, shape, file offset), so a model far
larger than memory is written with one tensor in memory at most. Large tensors start on 64 KiB
boundaries so ONNX Runtime can memory-map them (64 KiB is Windows' mapping granularity, a multiple of
every page size). ref: onnx/onnx docs/ExternalData.md (location, offset, length keys).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import numpy as np
from onnx import TensorProto, numpy_helper

ALIGN = 1 << 16
INLINE_BYTES = 1 << 16  # smaller tensors (norm weights, RoPE frequencies) stay inside the graph proto

_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.uint8): TensorProto.UINT8,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.float16): TensorProto.FLOAT16}


class ExternalData:
    """The `<model>.onnx.data` file beside a graph, filled as initializers are made."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")
        self.offset = 0
        self.tensors: list[TensorProto] = []

    def __enter__(self) -> ExternalData:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._file.close()

    def add(self, name: str, array: np.ndarray) -> str:
        """One whole tensor: inline when small, else appended to the data file."""
        if array.nbytes < INLINE_BYTES:
            self.tensors.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
            return name
        return self.add_chunks(name, array.dtype, array.shape, [array])

    def add_chunks(self, name: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> str:
        """A tensor given as consecutive row chunks (C order), so it never has to exist whole in memory."""
        pad = -self.offset % ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for chunk in chunks:
            if chunk.dtype != dtype:
                raise ValueError(f"{name}: chunk dtype {chunk.dtype} != {dtype}")
            data = np.ascontiguousarray(chunk)
            self._file.write(memoryview(data).cast("B"))
            self.offset += data.nbytes
        length = self.offset - start
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if length != expected:
            raise ValueError(f"{name}: wrote {length} bytes for shape {shape} ({expected} expected)")
        stub = TensorProto(name=name, data_type=_ONNX_TYPES[np.dtype(dtype)], dims=list(shape))
        stub.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(length))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        self.tensors.append(stub)
        return name

    def alias(self, name: str, of: str, shape: tuple[int, ...]) -> str:
        """A second initializer over the same bytes with another shape (a free reshape: ONNX Runtime's
        constant folding would otherwise copy the tensor, 0.3 GB for the 4B int4 embedding)."""
        source = next(t for t in self.tensors if t.name == of)
        if source.data_location != TensorProto.EXTERNAL or int(np.prod(shape)) != int(np.prod(source.dims)):
            raise ValueError(f"{name}: cannot alias {of} {list(source.dims)} as {shape}")
        stub = TensorProto()
        stub.CopyFrom(source)
        stub.name = name
        del stub.dims[:]
        stub.dims.extend(shape)
        self.tensors.append(stub)
        return name
