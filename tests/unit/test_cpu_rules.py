"""The CPU rules the backends choose kernels by: ONNX Runtime's exact u8 x u8 int8 kernels (x86 without VNNI,
where the u8 x s8 one saturates) and OpenVINO's bf16 (where it beats f32)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medgemma_edge.backends.cpu import bf16_pays, this_cpu, u8s8_saturates
from medgemma_edge.measure.encoder_advice import fastest_encoder

pytestmark = pytest.mark.unit

HASWELL = {"sse4_2", "avx", "avx2", "fma", "f16c"}
SKYLAKE_X = HASWELL | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}  # AVX-512 before VNNI
ZEN4 = SKYLAKE_X | {"avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN4 | {"avx512_fp16", "amx_tile", "amx_int8", "amx_bf16"}


@pytest.mark.parametrize(("machine", "numpy_vnni", "flags", "saturates"), [
    ("x86_64", None, HASWELL, True),
    ("x86_64", None, SKYLAKE_X, True),
    ("x86_64", None, SKYLAKE_X | {"avx512_vnni"}, False),  # Cascade Lake, Zen 4
    ("x86_64", None, HASWELL | {"avx_vnni"}, False),  # Alder Lake: VNNI without AVX-512
    ("AMD64", None, HASWELL | {"avxvnni"}, False),  # the spelling some kernels and macOS use
    # under `qemu-x86_64 -cpu Haswell`, /proc/cpuinfo is the host's: numpy's CPUID probe decides
    ("x86_64", False, SKYLAKE_X | {"avx512_vnni"}, True),
    ("x86_64", False, ZEN4 | {"avx_vnni"}, True),  # the same on a Zen 4 host, whose file lists AVX-VNNI too
    ("x86_64", False, HASWELL | {"avx_vnni"}, False),  # Alder Lake: no AVX-512 either way, AVX-VNNI counts
    ("x86_64", True, HASWELL, False),
    ("aarch64", None, {"asimd", "asimddp"}, False),
    ("arm64", None, set(), False),
])
def test_u8s8_saturates(machine: str, numpy_vnni: bool | None, flags: set[str], saturates: bool) -> None:
    assert u8s8_saturates(machine, numpy_vnni, flags) is saturates


def test_doctor_says_which_int8_kernels_run() -> None:
    def why(flags: set[str]) -> str:
        return fastest_encoder({"cpu": {"arch": "x86_64", "flags": sorted(flags)}})[1]

    assert "exact u8 x u8" in why(HASWELL) and "compare with" in why(HASWELL)
    assert "u8 x u8" not in why(SKYLAKE_X | {"avx512_vnni"})


@pytest.mark.parametrize(("vendor", "flags", "pays"), [
    ("AuthenticAMD", ZEN4, True),  # the EPYC of issue 14's screens: bf16 0.35x mtmd F16, f32 0.72x
    ("GenuineIntel", ZEN4 | {"avx512_fp16"}, False),  # the Xeon of the screens: bf16 slower than f32
    ("GenuineIntel", SAPPHIRE_RAPIDS, True),  # AMX tiles
    ("AuthenticAMD", SKYLAKE_X | {"avx512_vnni"}, False),  # no bf16 instructions at all
    ("", ZEN4, False),  # vendor unknown: keep f32, the choice that never measured slower
])
def test_bf16_pays(vendor: str, flags: set[str], pays: bool) -> None:
    assert bf16_pays(vendor, flags) is pays


def test_this_cpu_reads_vendor_and_flags() -> None:
    vendor, flags = this_cpu()
    assert isinstance(vendor, str) and isinstance(flags, frozenset)
    if Path("/proc/cpuinfo").is_file():
        assert vendor and flags  # every Linux /proc/cpuinfo we run on names both
