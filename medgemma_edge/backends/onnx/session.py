"""ONNX Runtime sessions: provider choice (CUDA when onnxruntime-gpu and a GPU are there, else CPU),
thread count, graph optimisations, and one-line errors for files ONNX Runtime cannot load."""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
from pathlib import Path
from typing import Any

from medgemma_edge.backends.cpu import numpy_avx512_vnni, this_cpu, u8s8_saturates
from medgemma_edge.errors import UserError

log = logging.getLogger(__name__)


SHORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
               "openvino": "OpenVINOExecutionProvider", "dml": "DmlExecutionProvider", "coreml": "CoreMLExecutionProvider"}


def provider_names(short: list[str]) -> list[str]:
    """`cuda,cpu` -> ONNX Runtime provider names, refusing ones this onnxruntime build lacks."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    by_lower = {a.lower(): a for a in available}
    names = [SHORT_NAMES.get(s.lower()) or by_lower.get(s.lower(), s) for s in short]
    missing = [n for n in names if n not in available]
    if missing:
        raise UserError(f"--providers: {missing[0]} is not available in this onnxruntime (available: {', '.join(available)}); "
                        f"for CUDA install onnxruntime-gpu (pip install 'medgemma-edge[gpu]')")
    return names


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@functools.cache
def _this_cpu_saturates() -> bool:
    saturates = u8s8_saturates(platform.machine(), numpy_avx512_vnni(), this_cpu()[1])
    if saturates:
        log.info("no VNNI on this CPU: int8 MatMuls run ONNX Runtime's exact u8 x u8 kernels")
    return saturates


def make_session(path: Path, providers: list[str] | None = None, n_threads: int | None = None,
                 level: str = "ALL", spin: bool = True, exact_int8: bool | None = None) -> Any:
    """level: ORT graph optimisation (BASIC, EXTENDED, ALL); spin: let idle intra-op threads spin-wait;
    exact_int8: run int8 MatMuls on u8 x u8 kernels (None: where this CPU's u8 x s8 kernel saturates)."""
    import onnxruntime as ort

    if not path.is_file():
        raise UserError(f"{path}: ONNX file not found; re-run `medgemma-edge convert`")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    opts.log_severity_level = 3  # ORT's warnings are ours to turn into clear errors
    if n_threads:
        opts.intra_op_num_threads = n_threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if _this_cpu_saturates() if exact_int8 is None else exact_int8:
        # ref: onnxruntime_session_options_config_keys.h kOrtSessionOptionsAvx2PrecisionMode: s8 weights
        # become u8 (Avx2WeightS8ToU8Transformer, QDQS8ToU8Transformer); ORT applies it only where MLAS
        # reports the overflow; u8 x u8 took 1.28x the time of u8 x s8 on the 4B encoder (VNNI EPYC), so
        # VNNI CPUs, whose u8 x s8 kernel is exact, go without it
        opts.add_session_config_entry("session.x64quantprecision", "1")
    try:
        session = ort.InferenceSession(str(path), opts, providers=providers or default_providers())
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for corrupt files
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: ONNX Runtime cannot load this model ({first}); re-run `medgemma-edge convert`") from exc
    release_freed_heap()
    log.info("%s on %s", path.name, session.get_providers())
    return session


def release_freed_heap() -> None:
    """Hand the heap ONNX Runtime freed while loading (the parsed protobuf) back to the OS.

    glibc keeps it otherwise: 0.26 GB of the 4B int8 vision encoder's 1.16 GB peak. No-op off glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
