"""`doctor`'s encoder line: which image encoder wins on which CPU (issue 14's measurements), from a fingerprint."""

from __future__ import annotations

from typing import Any

import pytest

from medgemma_edge.measure.doctor import advice, render
from medgemma_edge.measure.encoder_advice import encoder_tips, fastest_encoder

pytestmark = pytest.mark.unit


def _fp(flags: list[str], openvino: str | None = None) -> dict[str, Any]:
    return {"cpu": {"model": "x", "arch": "x86_64", "logical_cores": 2, "physical_cores": 2, "usable_cores": 2,
                    "flags": flags},
            "versions": {"openvino": openvino}, "gpus": [], "os": "Linux", "python": "3.12", "ram_gb": 24,
            "llama_cpp": {"error": None, "system_info": " ".join(f"{f.upper()} = 1" for f in flags),
                          "lib_path_env": {}, "gpu_offload": False, "backends": [], "library": "l",
                          "mtmd_library": "m", "ggml_libraries": []},
            "onnxruntime": {"providers": ["CPUExecutionProvider"], "device": "CPU", "error": None}}


@pytest.mark.parametrize(("flags", "expect"), [
    (["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16"], "onnx:int8"),  # the Intel screen machine
    (["avx2", "avx512f", "avx512_vnni", "avx512_bf16"], "onnx:int8"),  # the AMD EPYC suite machine
    (["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"], "ov:bf16"),
    (["avx2", "fma"], "onnx:int8"),
])
def test_fastest_encoder_by_cpu(flags: list[str], expect: str) -> None:
    encoder, why = fastest_encoder(_fp(flags))
    assert encoder == expect and why


def test_amx_without_openvino_says_what_to_install() -> None:
    amx = ["avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"]
    (tip,) = encoder_tips(_fp(amx))
    assert "pip install 'medgemma-edge[openvino]'" in tip and "--ov-vision" in tip
    assert encoder_tips(_fp(amx, openvino="2026.4.1")) == []
    assert encoder_tips(_fp(["avx512f", "avx512_bf16"])) == []  # nothing to install where onnx:int8 wins
    assert any("medgemma-edge[openvino]" in t for t in advice(_fp(amx)))


def test_render_names_the_encoder() -> None:
    fp = _fp(["avx2", "avx512f", "avx512_vnni", "avx512_bf16"])
    fp["versions"] = {"openvino": None, "onnxruntime": "1.32.0"}
    encoder, why = fastest_encoder(fp)
    lines = render({"slug": "x", "fingerprint": fp, "advice": [], "encoder": {"fastest": encoder, "why": why}})
    assert any(line.startswith("Encoder      fastest on this CPU: onnx:int8") for line in lines)
