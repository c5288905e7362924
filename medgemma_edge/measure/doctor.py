"""`medgemma-edge doctor`: what this machine has, what our runtimes loaded, and what to install for a GPU.

The advice is derived only from the hardware fingerprint, so it can be tested without a GPU by
feeding a fingerprint dict; the commands it prints are the ones README's build section documents.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from medgemma_edge.backends.llama_cpp.lib import AMX_FREE_BUILD, has_amx_kernels
from medgemma_edge.measure.encoder_advice import encoder_tips, fastest_encoder
from medgemma_edge.measure.hardware import fingerprint, slug

log = logging.getLogger(__name__)

_ENV_VARS = ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")
# llama.cpp system_info names for the CPU flags that matter most; a CPU flag whose name reads
# "= 0" (or is absent) means the loaded libggml was built for an older CPU than this one. AMX is left out on
# purpose: its kernels crash (backends/llama_cpp/lib.py), so our builds compile them out.
_SYSTEM_INFO_NAMES = {"avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX512",
                      "avx512_vnni": "AVX512_VNNI", "avx_vnni": "AVX_VNNI", "avx512_bf16": "AVX512_BF16"}


def _lib_names(base: str) -> list[str]:
    """File names llama-cpp-python tries in the folder. ref: llama_cpp/_ctypes_extensions.py load_shared_library"""
    if sys.platform == "win32":
        return [f"{base}.dll", f"lib{base}.dll"]
    return [f"lib{base}.so", f"lib{base}.dylib"] if sys.platform == "darwin" else [f"lib{base}.so"]


def _has_lib(folder: Path, base: str) -> bool:
    return any((folder / name).exists() for name in _lib_names(base))


def _build_commands(backend: str) -> list[str]:
    """The CMakeLists.txt at the root of a medgemma-edge source checkout; README documents the same lines."""
    folder = "build/native" if backend == "cpu" else f"build/{backend}"
    lib_dir = f"$PWD/{folder}/bin"
    return [f"cmake -S . -B {folder} -G Ninja -DMEDGEMMA_BACKEND={backend} && cmake --build {folder} -j "
            f"&& ctest --test-dir {folder} --output-on-failure",
            f"export LLAMA_CPP_LIB_PATH={lib_dir} MTMD_CPP_LIB={lib_dir}"]


def _env_problems(llama: dict[str, Any]) -> list[str]:
    """Both variables name a folder (llama-cpp-python appends lib<name>.so), a common mix-up."""
    problems = []
    env = llama.get("lib_path_env") or {}
    wanted = {"LLAMA_CPP_LIB_PATH": "llama", "MTMD_CPP_LIB": "mtmd"}
    for var in _ENV_VARS:
        value = env.get(var)
        if not value:
            continue
        path = Path(value)
        lib = _lib_names(wanted[var])[-1 if sys.platform == "darwin" else 0]
        if path.is_file():
            problems.append(f"{var}={value} is a file, but llama-cpp-python expects the folder that holds {lib}: "
                            f"export {var}={path.parent}")
        elif not _has_lib(path, wanted[var]):
            problems.append(f"{var}={value} has no {lib}: point it at the folder holding {lib} "
                            f"(a cmake build puts it in build/<backend>/bin) or unset {var}")
    llama_dir, mtmd_dir = env.get("LLAMA_CPP_LIB_PATH"), env.get("MTMD_CPP_LIB")
    if llama_dir and not mtmd_dir and _has_lib(Path(llama_dir), "llama"):
        problems.append(f"LLAMA_CPP_LIB_PATH is set but MTMD_CPP_LIB is not, so the bundled libmtmd (images) runs "
                        f"against your libllama: export MTMD_CPP_LIB={llama_dir}")
    return problems


def _missing_cpu_features(fp: dict[str, Any]) -> list[str]:
    info = (fp.get("llama_cpp") or {}).get("system_info") or ""
    flags = set((fp.get("cpu") or {}).get("flags") or [])
    missing = []
    for flag, name in _SYSTEM_INFO_NAMES.items():
        if flag in flags and f"{name} = 1" not in info:
            missing.append(name)
    return missing


def onnxruntime_provider_advice(fp: dict[str, Any]) -> list[str]:
    """Which ONNX Runtime package gives this workstation's GPU a provider (NVIDIA: in advice()).

    The DirectML build replaces the `onnxruntime` module: a swap, not an addition. OpenVINO's provider comes
    as a plugin of the stock onnxruntime (onnxruntime-ep-openvino); it runs the whole ONNX decoder only when
    that was converted with --onnx-attention portable (benchmarks/README.md, "Execution providers").
    """
    providers = set((fp.get("onnxruntime") or {}).get("providers") or [])
    vendors = {g.get("vendor") for g in fp.get("gpus") or []}
    windows = str(fp.get("os") or "").lower().startswith("windows")
    if "NVIDIA" in vendors or providers & {"DmlExecutionProvider", "OpenVINOExecutionProvider"}:
        return []
    if windows and vendors & {"AMD", "Intel"}:
        return ["ONNX Runtime: for this GPU on Windows install the DirectML build: pip uninstall -y onnxruntime "
                "&& pip install onnxruntime-directml, then --providers dml,cpu (nodes DirectML lacks run on the CPU; "
                "not measured by this project)"]
    if "Intel" in vendors:
        steps = ("convert the ONNX decoder with --onnx-attention portable and run it with --providers openvino:gpu,cpu "
                 "(measured on OpenVINO's CPU device only; the GPU device is not measured by this project)")
        if (fp.get("versions") or {}).get("onnxruntime_ep_openvino"):
            return [f"ONNX Runtime: for this Intel GPU {steps}"]
        return [f"ONNX Runtime: for this Intel GPU install OpenVINO's provider plugin: pip install "
                f"'medgemma-edge[openvino-ep]' (it adds to onnxruntime, no swap); then {steps}"]
    return []


def advice(fp: dict[str, Any]) -> list[str]:
    """Concrete next steps for this machine; an empty list means the setup already fits the hardware."""
    llama = fp.get("llama_cpp") or {}
    ort = fp.get("onnxruntime") or {}
    gpus = fp.get("gpus") or []
    vendors = {g.get("vendor") for g in gpus}
    tips = _env_problems(llama)
    if llama.get("error"):
        tips.append(f"llama-cpp-python cannot load its libraries ({llama['error']}); "
                    + ("fix the environment variables above" if tips else
                       "reinstall it: pip install --force-reinstall --no-deps 'llama-cpp-python==0.3.36'"))
        return tips

    if "NVIDIA" in vendors:
        if not llama.get("gpu_offload"):
            tips.append("llama.cpp was built without a GPU backend although an NVIDIA GPU is present; "
                        "build it for CUDA in a medgemma-edge checkout (needs the CUDA toolkit, nvcc):")
            tips.extend("    " + c for c in _build_commands("cuda"))
        if "CUDAExecutionProvider" not in (ort.get("providers") or []):
            tips.append("onnxruntime has no CUDAExecutionProvider; swap it for onnxruntime-gpu: "
                        "pip uninstall -y onnxruntime && pip install 'medgemma-edge[gpu]'")
    elif "Apple" in vendors and not llama.get("gpu_offload"):
        tips.append("llama.cpp was built without Metal; build it for the Apple GPU in a medgemma-edge checkout:")
        tips.extend("    " + c for c in _build_commands("metal"))
    elif vendors & {"AMD", "Intel"} and not llama.get("gpu_offload"):
        name = next(g["name"] for g in gpus if g.get("vendor") in ("AMD", "Intel"))
        tips.append(f"llama.cpp was built without a GPU backend although {name} is present; build it for Vulkan "
                    "in a medgemma-edge checkout (needs libvulkan-dev and glslc):")
        tips.extend("    " + c for c in _build_commands("vulkan"))

    tips.extend(onnxruntime_provider_advice(fp))
    tips.extend(encoder_tips(fp))
    if has_amx_kernels(llama.get("system_info") or ""):
        tips.append("the loaded llama.cpp has AMX kernels, which crash on AMX CPUs, so medgemma-edge runs it "
                    f"without repacked weights (slower decoding); rebuild it without them: {AMX_FREE_BUILD}")
    missing = _missing_cpu_features(fp)
    if missing:
        tips.append(f"the loaded llama.cpp does not use this CPU's {', '.join(missing)}; "
                    "a native build in a medgemma-edge checkout is faster on CPU:")
        tips.extend("    " + c for c in _build_commands("cpu"))
    return tips


def diagnose() -> dict[str, Any]:
    """Fingerprint + hardware slug + advice, the payload of `doctor --json`."""
    fp = fingerprint()
    encoder, why = fastest_encoder(fp)
    return {"slug": slug(fp), "fingerprint": fp, "advice": advice(fp), "encoder": {"fastest": encoder, "why": why}}


def _fmt_gb(value: float | None) -> str:
    return f"{value:g} GB" if value else "? GB"


def render(result: dict[str, Any]) -> list[str]:
    """The human-readable report, one string per line."""
    fp = result["fingerprint"]
    cpu, llama, ort, versions = fp["cpu"], fp["llama_cpp"], fp["onnxruntime"], fp["versions"]
    lines = [f"medgemma-edge doctor   (hardware slug: {result['slug']})",
             f"CPU          {cpu['model'] or 'unknown'} [{cpu['arch'] or '?'}]: {cpu['logical_cores'] or '?'} logical, "
             f"{cpu['physical_cores'] or '?'} physical, {cpu['usable_cores'] or '?'} usable cores",
             f"SIMD         {' '.join(cpu['flags']) or 'none detected'}",
             f"RAM          {_fmt_gb(fp['ram_gb'])}"]
    if fp["gpus"]:
        for gpu in fp["gpus"]:
            lines.append(f"GPU          {gpu['name']}, {_fmt_gb(gpu['memory_gb'])}, driver {gpu['driver'] or '?'}")
    else:
        lines.append("GPU          none found (no nvidia-smi on PATH, no GPU in /sys/class/drm)")
    lines += [f"OS           {fp['os']}, Python {fp['python']}",
              "Versions     " + ", ".join(f"{k.replace('_', '-')} {v or 'not installed'}" for k, v in versions.items())]

    env = llama["lib_path_env"]
    lines.append("llama.cpp    " + "  ".join(f"{k}={v if v else '(unset)'}" for k, v in env.items()))
    if llama["error"]:
        lines.append(f"             cannot load: {llama['error']}")
    else:
        origin = "from LLAMA_CPP_LIB_PATH" if env.get("LLAMA_CPP_LIB_PATH") else "bundled with llama-cpp-python"
        lines += [f"  libllama   {llama['library']}   ({origin})",
                  f"  libmtmd    {llama['mtmd_library']}"]
        lines += [f"  libggml    {p}" for p in llama["ggml_libraries"]]
        for dev in llama["backends"]:
            detail = ", ".join(x for x in (dev.get("description"), dev.get("type"),
                                           _fmt_gb(dev["memory_gb"]) if dev.get("memory_gb") else None) if x)
            lines.append(f"  device     {dev['name']}" + (f" ({detail})" if detail else ""))
        lines += [f"  GPU offload {'yes' if llama['gpu_offload'] else 'no'}",
                  f"  system     {llama['system_info'] or '?'}"]

    providers = ", ".join(ort["providers"]) or "none"
    lines.append(f"ONNX Runtime providers: {providers} (device {ort['device'] or '?'})"
                 + (f"; cannot import: {ort['error']}" if ort["error"] else ""))

    if result.get("encoder"):
        lines.append(f"Encoder      fastest on this CPU: {result['encoder']['fastest']} ({result['encoder']['why']})")
    tips = result["advice"]
    lines.append("Advice" if tips else "Advice       none: the loaded runtimes already match this hardware")
    lines += [tip if tip.startswith("    ") else f"  - {tip}" for tip in tips]
    return lines
