"""What this machine is and what our native runtimes will run on: CPU, RAM, GPUs, the loaded libllama.

Used by `medgemma-edge doctor` and to name benchmark result files. Every probe is best effort:
a missing tool or file yields a null field, never an exception, and nothing touches the network.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from medgemma_edge.versions import package_version

log = logging.getLogger(__name__)

# The CPU features ggml and ONNX Runtime pick kernels by; the other ~100 flags say nothing about speed.
SIMD_FLAGS = frozenset({
    "sse3", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
    "avx512dq", "avx512cd", "avx512_vnni", "avx512vnni", "avx512_bf16", "avx512_fp16", "avx512_vbmi",
    "avx512vbmi", "avx_vnni", "avxvnni", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
    # arm64 (/proc/cpuinfo "Features", macOS hw.optional.arm.FEAT_*)
    "neon", "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "i8mm", "bf16", "sme", "dotprod",
})
_NVIDIA_SMI_TIMEOUT_S = 3.0
_SYSCTL_TIMEOUT_S = 1.0
# PCI vendor ids in /sys/class/drm/*/device/vendor, for GPUs nvidia-smi cannot see.
_PCI_VENDORS = {"0x1002": "AMD", "0x8086": "Intel", "0x10de": "NVIDIA"}
_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}  # ref: ggml-backend.h ggml_backend_dev_type


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _run(cmd: list[str], timeout: float) -> str | None:
    """stdout of a local tool, or None when it is absent, fails or hangs."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s failed: %s", cmd[0], exc)
        return None
    return done.stdout if done.returncode == 0 else None


def _sysctl(name: str) -> str | None:
    out = _run(["sysctl", "-n", name], _SYSCTL_TIMEOUT_S)
    return out.strip() if out else None


def _cpu() -> dict[str, Any]:
    model: str | None = None
    vendor: str | None = None
    physical: int | None = None
    flags: set[str] = set()
    info = _read("/proc/cpuinfo") if sys.platform.startswith("linux") else None
    if info:
        cores: set[tuple[str, str]] = set()
        phys_id = core_id = ""
        for line in info.splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip().lower(), value.strip()
            if key == "model name" and not model:
                model = value
            elif key == "vendor_id" and not vendor:
                vendor = value
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
            elif key == "physical id":
                phys_id = value
            elif key == "core id":
                core_id = value
                cores.add((phys_id, core_id))
        physical = len(cores) or None  # arm64 and many VMs do not list core ids
        if not model:  # arm64 Linux has no "model name"; the device tree names the board
            model = (_read("/proc/device-tree/model") or "").strip("\x00\n ") or None
    elif sys.platform == "darwin":
        model = _sysctl("machdep.cpu.brand_string")
        vendor = _sysctl("machdep.cpu.vendor")  # GenuineIntel on Intel Macs; absent on Apple silicon
        physical = int(_sysctl("hw.physicalcpu") or 0) or None
        for name in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
            flags |= {f.lower().replace(".", "_") for f in (_sysctl(name) or "").split()}
        optional = _run(["sysctl", "hw.optional"], _SYSCTL_TIMEOUT_S) or ""
        for line in optional.splitlines():  # hw.optional.arm.FEAT_DotProd: 1
            key, _, value = line.partition(":")
            if value.strip() == "1":
                flags.add(key.rsplit(".", 1)[-1].lower().removeprefix("feat_"))
        if platform.machine() == "arm64":
            flags.add("neon")  # every Apple silicon core has it; sysctl does not list it
    return {
        "model": model or platform.processor() or platform.machine() or None,
        "vendor": vendor,  # AuthenticAMD / GenuineIntel: which bf16 kernels pay differs (backends.cpu.bf16_pays)
        "arch": platform.machine() or None,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        # Containers and taskset limit what we may use; thread counts should follow this one.
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "flags": sorted(flags & SIMD_FLAGS),
    }


def _ram_gb() -> float | None:
    info = _read("/proc/meminfo")
    if info:
        match = re.search(r"^MemTotal:\s+(\d+)\s+kB", info, re.MULTILINE)
        if match:
            return round(int(match.group(1)) / 2**20, 1)
    if sys.platform == "darwin":
        size = _sysctl("hw.memsize")
        if size and size.isdigit():
            return round(int(size) / 2**30, 1)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        return None


def _nvidia_gpus() -> list[dict[str, Any]]:
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
               _NVIDIA_SMI_TIMEOUT_S)
    gpus = []
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[0]:
            continue
        mib = parts[1]
        gpus.append({"name": parts[0], "vendor": "NVIDIA",
                     "memory_gb": round(float(mib) / 1024, 1) if mib.replace(".", "", 1).isdigit() else None,
                     "driver": parts[2] or None})
    return gpus


def _other_gpus(skip_nvidia: bool) -> list[dict[str, Any]]:
    """AMD/Intel (and driverless NVIDIA) display devices from sysfs: they decide the Vulkan advice."""
    gpus = []
    for card in sorted(Path("/sys/class/drm").glob("card[0-9]*")):
        if "-" in card.name:  # card0-HDMI-A-1 is a connector, not a device
            continue
        vendor = _PCI_VENDORS.get((_read(card / "device" / "vendor") or "").strip())
        if vendor is None or (vendor == "NVIDIA" and skip_nvidia):
            continue
        vram = (_read(card / "device" / "mem_info_vram_total") or "").strip()  # amdgpu only
        link = card / "device" / "driver"
        driver = Path(os.path.realpath(link)).name if link.exists() else None
        gpus.append({"name": f"{vendor} GPU ({card.name})", "vendor": vendor,
                     "memory_gb": round(int(vram) / 2**30, 1) if vram.isdigit() else None, "driver": driver})
    return gpus


def _gpus() -> list[dict[str, Any]]:
    nvidia = _nvidia_gpus()
    gpus = nvidia + (_other_gpus(skip_nvidia=bool(nvidia)) if sys.platform.startswith("linux") else [])
    if sys.platform == "darwin" and platform.machine() == "arm64":
        gpus.append({"name": "Apple silicon GPU (Metal)", "vendor": "Apple", "memory_gb": None, "driver": "Metal"})
    return gpus


def _loaded_paths(pattern: str) -> list[str]:
    """Shared objects of this process matching `pattern` (Linux): the truth about what was loaded."""
    maps = _read("/proc/self/maps") or ""
    seen: dict[str, None] = {}
    for line in maps.splitlines():
        path = line.split(None, 5)[-1] if line.count(" ") >= 5 else ""
        if path.startswith("/") and re.search(pattern, os.path.basename(path)):
            seen.setdefault(path, None)
    return list(seen)


def _ggml_devices(lib_dir: Path) -> list[dict[str, Any]] | None:
    """ggml's registered devices, asked of the libggml that sits beside (and was loaded with) libllama.

    llama-cpp-python binds no ggml_backend_dev_* functions, and its `_ggml` module always opens the
    bundled libggml, so opening the file next to libllama is what reaches the copy actually in use.
    """
    names = {"darwin": ["libggml.dylib", "libggml.so"], "win32": ["ggml.dll", "libggml.dll"]}
    for name in names.get(sys.platform, ["libggml.so"]):
        if (lib_dir / name).exists():
            break
    else:
        return None
    try:
        ggml = ctypes.CDLL(str(lib_dir / name))
        ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
            getattr(ggml, fn).restype = ctypes.c_char_p
            getattr(ggml, fn).argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_dev_type.restype = ctypes.c_int
        ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_dev_memory.restype = None
        ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                 ctypes.POINTER(ctypes.c_size_t)]
        devices = []
        for i in range(ggml.ggml_backend_dev_count()):
            dev = ggml.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            devices.append({
                "name": (ggml.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
                "description": (ggml.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                "type": _DEVICE_TYPES.get(ggml.ggml_backend_dev_type(dev), "unknown"),
                "memory_gb": round(total.value / 2**30, 1) if total.value else None,
            })
        return devices
    except (OSError, AttributeError) as exc:  # an older libggml without the device API
        log.debug("ggml device query failed: %s", exc)
        return None


def _backends_from_system_info(system_info: str) -> list[dict[str, Any]]:
    # "CPU : SSE3 = 1 | ... | CUDA : ARCHS = 890 | ..." -> one entry per "NAME :" group
    return [{"name": name, "description": None, "type": None, "memory_gb": None}
            for name in dict.fromkeys(re.findall(r"(?:^|\|)\s*([A-Za-z][\w-]*)\s*:", system_info))]


def _llama_cpp() -> dict[str, Any]:
    result: dict[str, Any] = {
        "library": None, "mtmd_library": None, "ggml_libraries": [], "system_info": None, "backends": [],
        "gpu_offload": None, "error": None,
        "lib_path_env": {name: os.environ.get(name) for name in ("LLAMA_CPP_LIB_PATH", "MTMD_CPP_LIB")},
    }
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp
    except Exception as exc:  # noqa: BLE001 - llama-cpp-python raises FileNotFoundError/RuntimeError/OSError
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    # ctypes keeps the path it was given; llama-cpp-python builds it from LLAMA_CPP_LIB_PATH or its lib/.
    library = Path(llama_cpp.llama_cpp._lib._name).resolve()
    result["library"] = str(library)
    result["mtmd_library"] = str(Path(mtmd_cpp._libmtmd._name).resolve())
    result["ggml_libraries"] = _loaded_paths(r"^(lib)?ggml.*\.(so|dylib|dll)")
    try:
        result["system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        result["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except (AttributeError, OSError) as exc:
        log.debug("llama.cpp system info failed: %s", exc)
    devices = _ggml_devices(library.parent)
    result["backends"] = devices if devices is not None else _backends_from_system_info(result["system_info"] or "")
    return result


def _onnxruntime() -> dict[str, Any]:
    try:
        import onnxruntime as ort

        return {"providers": list(ort.get_available_providers()), "device": ort.get_device(), "error": None}
    except Exception as exc:  # noqa: BLE001 - a broken install is a finding, not a crash
        return {"providers": [], "device": None, "error": f"{type(exc).__name__}: {exc}"}


def fingerprint() -> dict[str, Any]:
    """Everything that decides how fast (and whether) MedGemma runs here, as plain JSON-able data."""
    return {
        "cpu": _cpu(),
        "ram_gb": _ram_gb(),
        "gpus": _gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "medgemma_edge": package_version("medgemma-edge"),
            "llama_cpp_python": package_version("llama-cpp-python", "llama_cpp_python"),
            "onnxruntime": package_version("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"),
            "numpy": package_version("numpy"),
            "openvino": package_version("openvino"),
            "onnxruntime_ep_openvino": package_version("onnxruntime-ep-openvino"),
        },
        "llama_cpp": _llama_cpp(),
        "onnxruntime": _onnxruntime(),
    }


# Marketing words that make file names long without telling machines apart.
_NOISE = {"r", "tm", "c", "cpu", "processor", "core", "with", "radeon", "graphics", "gen", "@", "ghz", "nvidia",
          "geforce", "pcie", "sxm", "sxm5", "hbm3", "nvl", "mobile", "laptop", "gpu", "apple", "silicon", "(metal)"}


def _words(text: str, limit: int) -> list[str]:
    text = re.sub(r"\(\w+\)|\d+(\.\d+)?\s*ghz|\d+-core", " ", text.lower())
    words = [w for w in re.split(r"[^a-z0-9]+", text) if w and w not in _NOISE]
    return words[:limit]


def slug(fp: dict[str, Any]) -> str:
    """Short filesystem-safe hardware name, e.g. `amd-epyc-2c` or `intel-xeon-gold-6338-16c-h100`."""
    cpu = fp.get("cpu") or {}
    parts = _words(str(cpu.get("model") or cpu.get("arch") or "cpu"), 4) or ["cpu"]
    if cpu.get("logical_cores"):
        parts.append(f"{cpu['logical_cores']}c")
    gpus = fp.get("gpus") or []
    if gpus:
        gpu_words = _words(str(gpus[0].get("name") or ""), 2)
        parts.extend(gpu_words[:1] if gpu_words and re.search(r"\d", gpu_words[0]) else gpu_words)
    name = "-".join(parts)
    return re.sub(r"[^a-z0-9-]+", "", name)[:64].strip("-") or "unknown"
