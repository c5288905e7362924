"""Streaming GGUF writing shared by the decoder and mmproj converters.

Tensor infos are declared first and data is written one tensor at a time, so a 4B model converts
holding a single tensor in memory (`GGUFWriter.add_tensor` would keep them all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from convert.checkpoint import Checkpoint

Q = gguf.GGMLQuantizationType
_STORED = {"BF16": Q.BF16, "F16": Q.F16, "F32": Q.F32}  # safetensors dtype -> the GGML type with the same bits


@dataclass(frozen=True)
class TensorJob:
    """One GGUF tensor: where it comes from, how it is transformed, what type it is stored in."""

    src: str  # canonical checkpoint name
    dst: str  # GGUF tensor name
    qtype: gguf.GGMLQuantizationType
    transform: Callable[[np.ndarray], np.ndarray] | None = None


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.F32:
        return data.astype(np.float32, copy=False)  # the 4B embedding is 2.7 GB: never copy it needlessly
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32, copy=False), qtype)


def write_gguf(path: Path, writer: gguf.GGUFWriter, ckpt: Checkpoint, jobs: list[TensorJob],
               desc: str, progress: bool) -> None:
    """Declare every tensor, write header and metadata, then stream the data tensor by tensor."""
    for job in jobs:
        shape = ckpt.shape(job.src)
        n_bytes = _nbytes(shape, job.qtype)
        # GGUF stores shapes innermost-first; the writer reverses numpy order for us.
        writer.add_tensor_info(job.dst, shape, np.dtype(np.float32), n_bytes, raw_dtype=job.qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for job in tqdm(jobs, desc=desc, unit="tensor", disable=not progress):
        if job.transform is None and _STORED.get(ckpt.dtype(job.src)) == job.qtype:
            writer.write_tensor_data(ckpt.get_raw(job.src))  # the checkpoint's own bits: no f32 round trip
            continue
        data = ckpt.get(job.src)
        if job.transform is not None:
            data = job.transform(data)
        writer.write_tensor_data(encode(data, job.qtype))
    writer.close()


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * type_size


def add_one(x: np.ndarray) -> np.ndarray:
    # ref: transformers Gemma3RMSNorm: output * (1.0 + weight); llama.cpp multiplies by the weight as stored
    return x + 1.0
