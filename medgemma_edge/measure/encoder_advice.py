"""Which image encoder to run on this CPU, from what issue 14 measured (benchmarks/README.md, "Vision encoder").

Derived from the hardware fingerprint alone (testable with a fingerprint dict). Measured on 2-core AVX-512 CPUs
without AMX (4-layer tower at 4B width, ratio to mtmd F16):
- an AMD EPYC (Zen 4, AVX512_BF16): ov:int8 with the rest in bf16 0.30x, ov:bf16 0.35x, onnx:int8 0.43x;
- an Intel Xeon (AVX512_BF16 and AVX512_FP16): OpenVINO's bf16 ran slower than its own f32, ov:int8 (f32 rest)
  took ~1.2x onnx:int8's time, so onnx:int8 wins there.
At 4B on a 2-core AMX Xeon (whole tower, ratio to mtmd F16): ov:bf16 0.145x, ov:int8 (bf16 rest) 0.162x, onnx:int8
0.273x, ov:int8 with the rest f32 0.358x: OpenVINO runs bf16 on the AMX tiles, ONNX Runtime's CPU kernels do not.
"""

from __future__ import annotations

from typing import Any

from medgemma_edge.backends.cpu import bf16_pays, u8s8_saturates

MEASURE = "benchmarks/vision_candidates.py"
SCREEN = "0.7x onnx:int8's time on the 4-layer screen of an AMD EPYC"


def _flags(fp: dict[str, Any]) -> set[str]:
    return set((fp.get("cpu") or {}).get("flags") or [])


def _bf16_pays(fp: dict[str, Any]) -> bool:
    return bf16_pays(str((fp.get("cpu") or {}).get("vendor") or ""), _flags(fp))


def fastest_encoder(fp: dict[str, Any]) -> tuple[str, str]:
    """(encoder artifact id, why) for encoding images on this machine's CPU."""
    flags = _flags(fp)
    if "amx_bf16" in flags:
        return "ov:bf16", ("this CPU has AMX, which OpenVINO runs bf16 on and ONNX Runtime's CPU kernels do not: at 4B "
                           "on a 2-core AMX Xeon 0.89x ov:int8's time and 0.53x onnx:int8's (ov:int8 holds 0.76 GB "
                           f"less); compare with {MEASURE}")
    if _bf16_pays(fp):
        return "ov:int8", (f"int8 GEMMs with the rest in bf16 on AMD's AVX512_BF16 ({SCREEN}); "
                           f"compare with {MEASURE}")
    if "avx512_vnni" in flags or "avx_vnni" in flags or "avxvnni" in flags:
        why = "int8 GEMMs on VNNI, ORT's flash attention; measured fastest on Intel AVX-512 CPUs without AMX"
        if "avx512_bf16" in flags:
            why += " (where AVX512_BF16 alone gave OpenVINO's bf16 no speed-up)"
        return "onnx:int8", why
    unmeasured = f"OpenVINO's encoders are unmeasured on this CPU: compare with {MEASURE}"
    if u8s8_saturates(str((fp.get("cpu") or {}).get("arch") or ""), None, flags):
        # the u8 x s8 kernel would saturate here; u8 x u8 took 1.28x its time on the VNNI suite machine (4B)
        return "onnx:int8", f"int8 GEMMs on ONNX Runtime's exact u8 x u8 kernels (no VNNI on this CPU); {unmeasured}"
    return "onnx:int8", f"int8 GEMMs; {unmeasured}"


def encoder_tips(fp: dict[str, Any]) -> list[str]:
    """Advice lines: what to install or convert for the faster encoder, when the setup lacks it."""
    encoder = fastest_encoder(fp)[0]
    if encoder.startswith("ov:") and not (fp.get("versions") or {}).get("openvino"):
        why = "this CPU has AMX" if "amx_bf16" in _flags(fp) else "this CPU runs bf16 faster than f32"
        return [f"{why}: OpenVINO's encoders (ov:int8, ov:bf16) use it, ONNX Runtime's CPU kernels do not: "
                "pip install 'medgemma-edge[openvino]', convert with --ov-vision bf16,int8, run with "
                f"--encoder {encoder}, and compare with {MEASURE}"]
    return []
