"""Which image encoder to run on this CPU, from what issue 14 measured (benchmarks/README.md, "Vision encoder").

Derived from the hardware fingerprint alone (testable with a fingerprint dict). Measured: onnx:int8 is the
fastest on 2-core AVX-512 CPUs without AMX (the AMD EPYC suite machine; an Intel Xeon with AVX512_BF16 and
AVX512_FP16, where OpenVINO's bf16 ran slower than its own f32 and ov:int8 took ~1.2x onnx:int8's time).
AMX (bf16 matrix tiles) is what OpenVINO's CPU plugin uses and ONNX Runtime's CPU kernels do not: there the
OpenVINO encoders are the candidates to measure.
"""

from __future__ import annotations

from typing import Any

from medgemma_edge.backends.onnx.session import u8s8_saturates

MEASURE = "benchmarks/vision_candidates.py"


def _flags(fp: dict[str, Any]) -> set[str]:
    return set((fp.get("cpu") or {}).get("flags") or [])


def fastest_encoder(fp: dict[str, Any]) -> tuple[str, str]:
    """(encoder artifact id, why) for encoding images on this machine's CPU."""
    flags = _flags(fp)
    if "amx_bf16" in flags:
        return "ov:bf16", (f"this CPU has AMX, which OpenVINO runs bf16 on and ONNX Runtime's CPU kernels do not; "
                           f"not measured on AMX yet: compare with {MEASURE}")
    if "avx512_vnni" in flags or "avx_vnni" in flags or "avxvnni" in flags:
        why = "int8 GEMMs on VNNI, ORT's flash attention; measured fastest on AVX-512 CPUs without AMX"
        if "avx512_bf16" in flags:
            why += " (AVX512_BF16 alone gave OpenVINO's bf16 no speed-up)"
        return "onnx:int8", why
    unmeasured = f"OpenVINO's encoders are unmeasured on this CPU: compare with {MEASURE}"
    if u8s8_saturates(str((fp.get("cpu") or {}).get("arch") or ""), None, flags):
        # the u8 x s8 kernel would saturate here; u8 x u8 took 1.28x its time on the VNNI suite machine (4B)
        return "onnx:int8", f"int8 GEMMs on ONNX Runtime's exact u8 x u8 kernels (no VNNI on this CPU); {unmeasured}"
    return "onnx:int8", f"int8 GEMMs; {unmeasured}"


def encoder_tips(fp: dict[str, Any]) -> list[str]:
    """Advice lines: what to install or convert for the faster encoder, when the setup lacks it."""
    if "amx_bf16" in _flags(fp) and not (fp.get("versions") or {}).get("openvino"):
        return ["this CPU has AMX: OpenVINO's encoders (ov:bf16, ov:int8) can use it, ONNX Runtime's CPU kernels "
                "cannot: pip install 'medgemma-edge[openvino]', convert with --ov-vision bf16,int8, run with "
                f"--encoder ov:bf16, and compare with {MEASURE}"]
    return []
