"""`doctor`'s encoder line: which image encoder wins on which CPU (issue 14's measurements), from a fingerprint."""

from __future__ import annotations

from typing import Any

import pytest

from medgemma_edge.measure.doctor import advice, render
from medgemma_edge.measure.encoder_advice import encoder_tips, fastest_encoder

pytestmark = pytest.mark.unit


def _fp(flags: list[str], openvino: str | None = None, vendor: str = "GenuineIntel") -> dict[str, Any]:
    return {"cpu": {"model": "x", "vendor": vendor, "arch": "x86_64", "logical_cores": 2, "physical_cores": 2,
                    "usable_cores": 2, "flags": flags},
            "versions": {"openvino": openvino}, "gpus": [], "os": "Linux", "python": "3.12", "ram_gb": 24,
            "llama_cpp": {"error": None, "system_info": " ".join(f"{f.upper()} = 1" for f in flags),
                          "lib_path_env": {}, "gpu_offload": False, "backends": [], "library": "l",
                          "mtmd_library": "m", "ggml_libraries": []},
            "onnxruntime": {"providers": ["CPUExecutionProvider"], "device": "CPU", "error": None}}


ZEN4 = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]


@pytest.mark.parametrize(("flags", "vendor", "expect"), [
    (ZEN4 + ["avx512_fp16"], "GenuineIntel", "onnx:int8"),  # the Intel screen machine: bf16 slower than f32
    (ZEN4, "AuthenticAMD", "ov:int8"),  # the AMD EPYC: int8 GEMMs with the rest in bf16, 0.7x onnx:int8
    (ZEN4, None, "onnx:int8"),  # a vendor the probe could not read: the choice that never measured slower
    (ZEN4 + ["amx_tile", "amx_int8", "amx_bf16"], "GenuineIntel", "ov:bf16"),  # the AMX Xeon: 0.89x ov:int8's time
    (["avx2", "fma"], "AuthenticAMD", "onnx:int8"),  # Zen 2/3: no bf16, no VNNI
])
def test_fastest_encoder_by_cpu(flags: list[str], vendor: str | None, expect: str) -> None:
    fp = _fp(flags)
    fp["cpu"]["vendor"] = vendor
    encoder, why = fastest_encoder(fp)
    assert encoder == expect and why


@pytest.mark.parametrize(("flags", "vendor"), [(["avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"], "GenuineIntel"),
                                               (ZEN4, "AuthenticAMD")])
def test_where_openvino_wins_without_it_says_what_to_install(flags: list[str], vendor: str) -> None:
    (tip,) = encoder_tips(_fp(flags, vendor=vendor))
    wanted = fastest_encoder(_fp(flags, vendor=vendor))[0]
    assert wanted == ("ov:bf16" if "amx_bf16" in flags else "ov:int8")
    assert "pip install 'medgemma-edge[openvino]'" in tip and "--ov-vision" in tip and f"--encoder {wanted}" in tip
    assert encoder_tips(_fp(flags, openvino="2026.4.1", vendor=vendor)) == []
    assert any("medgemma-edge[openvino]" in t for t in advice(_fp(flags, vendor=vendor)))


def test_nothing_to_install_where_onnx_int8_wins() -> None:
    assert encoder_tips(_fp(ZEN4 + ["avx512_fp16"])) == []


def test_render_names_the_encoder() -> None:
    fp = _fp(ZEN4)
    fp["versions"] = {"openvino": None, "onnxruntime": "1.32.0"}
    encoder, why = fastest_encoder(fp)
    lines = render({"slug": "x", "fingerprint": fp, "advice": [], "encoder": {"fastest": encoder, "why": why}})
    assert any(line.startswith("Encoder      fastest on this CPU: onnx:int8") for line in lines)
