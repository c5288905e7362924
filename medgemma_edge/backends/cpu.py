"""What this CPU is, for the backends' kernel choices: vendor, flags, and the rules measured on them.

Read once per process from /proc/cpuinfo (empty elsewhere) and numpy's own CPUID probe. The rules take their
inputs as arguments, so tests and `doctor` apply them to any fingerprint.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

X86 = ("x86_64", "amd64", "i686", "x86")


@functools.cache
def this_cpu() -> tuple[str, frozenset[str]]:
    """(vendor_id, flags) from /proc/cpuinfo: ("AuthenticAMD", {...}); ("", frozenset()) where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return "", frozenset()
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields.get("vendor_id", ""), frozenset((fields.get("flags") or fields.get("features") or "").split())


@functools.cache
def numpy_avx512_vnni() -> bool | None:
    """AVX512_VNNI as numpy's CPUID probe sees it (right under qemu's -cpu, unlike /proc/cpuinfo); None unknown."""
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # numpy 2, numpy 1
        try:
            return importlib.import_module(name).__cpu_features__.get("AVX512VNNI")
        except (ImportError, AttributeError):
            continue
    return None


def u8s8_saturates(machine: str, numpy_vnni: bool | None, cpu_flags: set[str] | frozenset[str]) -> bool:
    """Whether ONNX Runtime's u8 x s8 GEMM saturates on this CPU: x86 without VNNI, where MLAS's kernel
    (vpmaddubsw) adds pairs of products in int16, so full 8-bit weights overflow once 2 * 255 * |w| > 32767.

    numpy_vnni: AVX512_VNNI from numpy's CPUID probe; AVX-VNNI (Alder Lake and later, without AVX-512) only
    /proc/cpuinfo tells, so its flags count unless CPUID denies an AVX512_VNNI they list: then they describe
    another CPU (under `qemu-x86_64 -cpu Haswell` the file is the host's, AVX-VNNI included on a Zen 4 host).
    """
    if machine.lower() not in X86:
        return False  # arm64's sdot/udot kernels sum in int32
    listed = "avx512_vnni" in cpu_flags or "avx512vnni" in cpu_flags
    if numpy_vnni is False and listed:
        return True
    vnni = listed if numpy_vnni is None else numpy_vnni
    return not (vnni or "avx_vnni" in cpu_flags or "avxvnni" in cpu_flags)


def bf16_pays(vendor: str, cpu_flags: set[str] | frozenset[str]) -> bool:
    """Whether OpenVINO's bf16 inference beats its f32 on this CPU (issue 14's screens, benchmarks/README.md).

    AMX: bf16 matrix tiles (4B on a 2-core AMX Xeon: ov:int8 0.162x mtmd F16 with the rest in bf16, 0.358x in f32).
    AMD's AVX512_BF16 (Zen 4): the 4-layer tower ran 0.35x mtmd F16 in bf16 against
    0.72x in f32. Intel's AVX512_BF16 without AMX: bf16 ran slower than f32 (0.78x against 0.55x).
    """
    if "amx_bf16" in cpu_flags:
        return True
    return vendor == "AuthenticAMD" and "avx512_bf16" in cpu_flags
