"""The one precision table: every artifact kind the converter writes, with its help text, the
loader's default preference, the order of fidelity used to pick validation partners, and the
fidelity bounds that validate and the tests assert (DESIGN principle 2: the tolerance lives next
to the artifact type).

Bounds come from the tiny synthetic checkpoint (docs/parity.md). f32/fp32 and f16 follow the
contract (mean KL < 1e-4 / 1e-3); the quantized bounds are about 2x the measured values: random
weights have no redundancy, so these guard regressions rather than claim quality.
"""

from __future__ import annotations

from dataclasses import dataclass

from medgemma_edge.errors import UserError


@dataclass(frozen=True)
class Precision:
    kind: str  # "decoder" | "encoder"
    format: str  # "gguf" | "onnx"
    name: str  # "q4_k_m", "int8", ...
    help: str
    # decoder: mean KL(reference || ours) bound; encoder: the KL it may add on top of its decoder's bound
    max_kl: float
    min_top1: float | None = None  # decoder: top-1 agreement floor over prompt positions
    # encoder: worst-token cosine floor against the torch module (ONNX exports are checked when written)
    min_cosine: float | None = None

    @property
    def id(self) -> str:
        return f"{self.format}:{self.name}"


_ROWS = (
    Precision("decoder", "gguf", "f32", "full precision; the parity reference", 1e-4, 0.95),
    Precision("decoder", "gguf", "f16", "half precision, near-lossless", 1e-3, 0.95),
    Precision("decoder", "gguf", "bf16", "bfloat16, the checkpoint's own type", 5e-3, 0.95),
    Precision("decoder", "gguf", "q8_0", "8-bit blocks, close to f16 at half the size", 0.1, 0.75),
    Precision("decoder", "gguf", "q4_k_m", "4-bit k-quant mix, the usual workstation choice", 3.5, 0.3),
    Precision("decoder", "gguf", "q4_0", "4-bit blocks, smallest and least faithful", 5.0, 0.15),
    Precision("decoder", "onnx", "fp32", "ONNX Runtime, full precision", 1e-4, 0.95),
    Precision("decoder", "onnx", "int8", "ONNX Runtime, 8-bit weight-only MatMulNBits", 0.1, 0.75),
    # int4: the embedding lookup shares the LM head's 4-bit table (issue 13), measured 3.8 on image+text
    Precision("decoder", "onnx", "int4", "ONNX Runtime, 4-bit weight-only MatMulNBits", 7.5, 0.15),
    # 128-value blocks: a quarter of the scales, ONNX Runtime's faster CPU kernel for prompts; measured 5.8 on
    # image+text against int4's 3.9 (docs/onnx-decoder.md, "Block size")
    Precision("decoder", "onnx", "int4_b128", "4-bit MatMulNBits in 128-value blocks: faster prompts on CPUs, "
              "less faithful than int4", 11.0, 0.1),
    Precision("encoder", "gguf", "f32", "mmproj full precision", 1e-4),
    Precision("encoder", "gguf", "f16", "mmproj half precision (llama.cpp's default)", 1e-3),
    Precision("encoder", "gguf", "q8_0", "mmproj 8-bit blocks", 0.02),
    Precision("encoder", "onnx", "fp32", "SigLIP + projector graph, full precision", 1e-4, min_cosine=0.99999),
    Precision("encoder", "onnx", "fp16", "half precision (for GPUs)", 1e-3, min_cosine=0.999),
    Precision("encoder", "onnx", "int8", "dynamic int8 MatMuls: fastest on CPUs", 0.05, min_cosine=0.99),
    Precision("encoder", "onnx", "int8_static", "static QDQ int8, calibrated on your images", 0.05, min_cosine=0.99),
    # OpenVINO IRs (the `openvino` extra); floors of issue 14: 0.9999 for bf16, 0.999 for int8
    Precision("encoder", "ov", "bf16", "OpenVINO, bf16 where it beats f32 (AMX, AMD AVX512_BF16; f32 elsewhere)",
              5e-3, min_cosine=0.9999),
    Precision("encoder", "ov", "int8", "OpenVINO, NNCF int8 weights, int8 GEMMs; the rest bf16 where ov:bf16 runs "
              "bf16 (no calibration)", 0.05, min_cosine=0.999),
)
PRECISIONS: dict[str, dict[str, Precision]] = {"decoder": {}, "encoder": {}}
for _row in _ROWS:
    PRECISIONS[_row.kind][_row.id] = _row

# When the caller names no artifact: smallest faithful first for the decoder, most faithful
# affordable first for the encoder (vision is where quantization hurts most).
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    "decoder": ("gguf:q4_k_m", "gguf:q8_0", "gguf:q4_0", "gguf:f16", "gguf:bf16", "gguf:f32",
                "onnx:int4", "onnx:int4_b128", "onnx:int8", "onnx:fp32"),
    "encoder": ("gguf:f16", "onnx:int8_static", "onnx:int8", "ov:int8", "ov:bf16", "gguf:q8_0", "onnx:fp16",
                "gguf:f32", "onnx:fp32"),
}
# Validation partners, most faithful first: pairing with them isolates the artifact under test.
FAITHFUL_ORDER: dict[str, tuple[str, ...]] = {
    "decoder": ("gguf:f32", "onnx:fp32", "gguf:f16", "gguf:bf16", "gguf:q8_0", "onnx:int8", "gguf:q4_k_m",
                "gguf:q4_0", "onnx:int4", "onnx:int4_b128"),
    "encoder": ("gguf:f32", "onnx:fp32", "onnx:fp16", "gguf:f16", "ov:bf16", "gguf:q8_0", "onnx:int8_static",
                "ov:int8", "onnx:int8"),
}
# The converter's flag for each (kind, format).
FLAGS: dict[tuple[str, str], str] = {("decoder", "gguf"): "--gguf", ("encoder", "gguf"): "--mmproj",
                                     ("encoder", "onnx"): "--onnx-vision", ("decoder", "onnx"): "--onnx-decoder",
                                     ("encoder", "ov"): "--ov-vision"}


def names(kind: str, fmt: str) -> tuple[str, ...]:
    """Precision names of one (kind, format) in table order: ("f32", "f16", ...)."""
    return tuple(p.name for p in PRECISIONS[kind].values() if p.format == fmt)


def lookup(kind: str, artifact_id: str) -> Precision | None:
    return PRECISIONS[kind].get(artifact_id)


def check_names(asked: list[str], kind: str, fmt: str) -> list[str]:
    """The converter's list for one flag, de-duplicated, refusing unknown names with the known ones."""
    known = names(kind, fmt)
    bad = [p for p in asked if p not in known]
    if bad:
        raise UserError(f"{FLAGS[kind, fmt]} {bad[0]!r} is not supported; choose from {', '.join(known)}")
    return list(dict.fromkeys(asked))


def flag_help(kind: str, fmt: str) -> str:
    """Help text for a converter flag: each precision with its one-line description."""
    return "; ".join(f"{p.name}: {p.help}" for p in PRECISIONS[kind].values() if p.format == fmt)
