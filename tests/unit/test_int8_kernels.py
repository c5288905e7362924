"""Which CPUs get ONNX Runtime's exact u8 x u8 int8 kernels: x86 without VNNI, where the u8 x s8 one saturates."""

from __future__ import annotations

import pytest

from medgemma_edge.backends.onnx.session import u8s8_saturates
from medgemma_edge.measure.encoder_advice import fastest_encoder

pytestmark = pytest.mark.unit

HASWELL = {"sse4_2", "avx", "avx2", "fma", "f16c"}
SKYLAKE_X = HASWELL | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}  # AVX-512 before VNNI


@pytest.mark.parametrize(("machine", "numpy_vnni", "flags", "saturates"), [
    ("x86_64", None, HASWELL, True),
    ("x86_64", None, SKYLAKE_X, True),
    ("x86_64", None, SKYLAKE_X | {"avx512_vnni"}, False),  # Cascade Lake, Zen 4
    ("x86_64", None, HASWELL | {"avx_vnni"}, False),  # Alder Lake: VNNI without AVX-512
    ("AMD64", None, HASWELL | {"avxvnni"}, False),  # the spelling some kernels and macOS use
    # under `qemu-x86_64 -cpu Haswell`, /proc/cpuinfo is the host's: numpy's CPUID probe decides
    ("x86_64", False, SKYLAKE_X | {"avx512_vnni"}, True),
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
