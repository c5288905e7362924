"""ONNX Runtime sessions: provider choice (CUDA when onnxruntime-gpu and a GPU are there, else CPU; OpenVINO
from its plugin package on request), thread count, graph optimisations, and one-line errors for files ONNX
Runtime cannot load."""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import json
import logging
import platform
from pathlib import Path
from typing import Any

from medgemma_edge.backends.cpu import numpy_avx512_vnni, this_cpu, u8s8_saturates
from medgemma_edge.errors import UserError

log = logging.getLogger(__name__)


SHORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
               "openvino": "OpenVINOExecutionProvider", "dml": "DmlExecutionProvider", "coreml": "CoreMLExecutionProvider"}
# providers a stock onnxruntime can load from a plugin package (ONNX Runtime's plugin EP API), without swapping
# onnxruntime for a build of its own: provider -> (module, PyPI package)
PLUGINS = {"OpenVINOExecutionProvider": ("onnxruntime_ep_openvino", "onnxruntime-ep-openvino")}
# a device after the colon: OpenVINO's device type (CPU, GPU, NPU), the device number for the others
_registered: set[str] = set()


def provider_names(short: list[str]) -> list[str]:
    """`cuda,cpu` or `openvino:gpu,cpu` -> ONNX Runtime provider names (`name:DEVICE` where one was asked),
    refusing ones neither this onnxruntime build nor an installed plugin provides."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    by_lower = {a.lower(): a for a in available}
    out = []
    for entry in short:
        base, _, device = entry.partition(":")
        name = SHORT_NAMES.get(base.lower()) or by_lower.get(base.lower(), base)
        if name not in available and not _plugin_installed(name):
            hint = (f"for OpenVINO install {PLUGINS[name][1]} (pip install 'medgemma-edge[openvino-ep]')"
                    if name in PLUGINS else "for CUDA install onnxruntime-gpu (pip install 'medgemma-edge[gpu]')")
            raise UserError(f"--providers: {name} is not available in this onnxruntime (available: "
                            f"{', '.join(available)}); {hint}")
        out.append(f"{name}:{device.upper()}" if device else name)
    return out


def _plugin_installed(name: str) -> bool:
    return name in PLUGINS and importlib.util.find_spec(PLUGINS[name][0]) is not None


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def plugin_devices(name: str) -> list[tuple[Any, str]]:
    """A plugin provider's devices as (OrtEpDevice, kind: CPU, GPU, NPU), its library registered once per process."""
    import onnxruntime as ort

    if name not in _registered:
        if name == "OpenVINOExecutionProvider" and importlib.util.find_spec("openvino") is not None:
            # the `openvino` package's libopenvino first: the plugin ships a copy with the same soname but
            # without the PyTorch front end, and whichever loads first serves both (convert_model then fails)
            import openvino  # noqa: F401
        module = importlib.import_module(PLUGINS[name][0])
        ort.register_execution_provider_library(name, module.get_library_path())
        _registered.add(name)
    found = [d for d in ort.get_ep_devices() if d.ep_name == name]
    return [(d, str(d.ep_metadata.get("ov_device") or getattr(d.device.type, "name", d.device.type))) for d in found]


def _add_plugin(opts: Any, entry: str, n_threads: int | None) -> None:
    """Put a plugin provider's device first in `opts`."""
    name, _, device = entry.partition(":")
    found = plugin_devices(name)
    chosen = [d for d, kind in found if kind.upper() == (device or "CPU")]
    if not found:
        # onnxruntime-ep-openvino 1.8 offers Intel devices only, even OpenVINO's CPU device on an AMD CPU
        # (ref: microsoft/onnxruntime pull 31981, open)
        raise UserError(f"--providers: {name} has no {device or 'CPU'} device here: its plugin lists no device on "
                        f"this machine (it takes Intel CPUs, GPUs and NPUs only); use --providers cpu")
    if not chosen:
        kinds = [kind for _, kind in found]
        raise UserError(f"--providers: {name} has no {device or 'CPU'} device here (it has: {', '.join(kinds)}); "
                        f"choose one of those, e.g. --providers openvino:{kinds[0].lower()},cpu")
    # fp32 arithmetic, as the CPU provider and the fidelity reports: OpenVINO's default on AVX512_BF16/AMX CPUs
    # is bf16, which moved the tiny fp32 decoder's logits by 0.55 (5.7e-5 with the hint)
    config = {(device or "CPU"): {"INFERENCE_PRECISION_HINT": "f32"}}
    options = {"load_config": json.dumps(config), **({"num_of_threads": str(n_threads)} if n_threads else {})}
    opts.add_provider_for_devices(chosen[:1], options)


def _entry(entry: str) -> str | tuple[str, dict[str, str]]:
    name, _, device = entry.partition(":")
    if name == "OpenVINOExecutionProvider":  # onnxruntime-openvino's built-in provider: fp32, as the plugin's
        return name, {"device_type": device or "CPU", "precision": "FP32"}
    return (name, {"device_id": device}) if device else name


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
    entries = providers or default_providers()
    available = ort.get_available_providers()
    # once registered, a plugin's provider is listed as available, but a session reaches it only through
    # its device (add_provider_for_devices), never by name
    names = [e.partition(":")[0] for e in entries]
    plugins = [e for e, n in zip(entries, names) if n in PLUGINS and (n in _registered or n not in available)]
    for e in plugins[:1]:  # a plugin provider goes first; the CPU provider stays the fallback
        _add_plugin(opts, e, n_threads)
    try:
        if plugins:
            session = ort.InferenceSession(str(path), opts)
        else:
            session = ort.InferenceSession(str(path), opts, providers=[_entry(e) for e in entries])
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
