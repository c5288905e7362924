"""Figures from shapes alone: what a decoder GGUF of each precision weighs and what loading it needs.

For models too big to convert on the machine at hand (MedGemma 27B: 54 GB in bf16), the converter and the
loader state these before anything is written or read. The GGUF bytes follow llama.cpp's own type choice
per tensor (llama_model_quantize), so they match the files it writes to within the metadata's size.
"""

from __future__ import annotations

from typing import Any

from medgemma_edge.runtime import memory

# GGML type -> (values per block, bytes per block). ref: ggml/src/ggml-common.h (block_q8_0, block_q4_K, ...)
GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q5_0": (32, 22),
    "Q4_K": (256, 144), "Q6_K": (256, 210),
}
# precision -> the default GGML type of its matrices (ref: llama-quant.cpp llama_ftype_get_default_type)
DEFAULT_TYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K"}
# what a type falls back to when a row length is not a multiple of its block (ref: tensor_type_fallback)
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
# The GGUF metadata of a Gemma 3 decoder (262k-piece vocabulary with scores and types, chat template),
# measured on our converter's files: 6.5 MB.
METADATA_BYTES = 7 << 20


def _more_bits(i: int, n: int) -> bool:
    # ref: llama-quant.cpp use_more_bits: the first and last eighth, and every third layer between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fit(kind: str, ncols: int) -> str:
    """The type llama.cpp stores a matrix of row length `ncols` in when it asks for `kind`."""
    if ncols % GGML_BLOCKS[kind][0] == 0:
        return kind
    kind = _FALLBACK.get(kind, kind)
    return kind if ncols % GGML_BLOCKS[kind][0] == 0 else "F16"


def tensor_types(text: dict[str, Any], precision: str) -> dict[str, tuple[str, tuple[int, int]]]:
    """GGUF tensor name -> (GGML type, (rows, row length)) of a Gemma 3 decoder with tied embeddings, as
    llama.cpp's quantizer writes it from a bf16/f32 base (1-D norms stay F32)."""
    if precision not in DEFAULT_TYPE:
        raise ValueError(f"unknown decoder precision {precision!r}; known: {', '.join(DEFAULT_TYPE)}")
    h, ff, n = int(text["hidden_size"]), int(text["intermediate_size"]), int(text["num_layers"])
    q, kv = int(text["num_heads"]) * int(text["head_dim"]), int(text["num_kv_heads"]) * int(text["head_dim"])
    base = DEFAULT_TYPE[precision]
    quantized = precision in ("q8_0", "q4_0", "q4_k_m")
    out: dict[str, tuple[str, tuple[int, int]]] = {}
    # the tied embedding is quantized as the output tensor: Q6_K unless Q8_0 was asked or rows do not fit
    # (ref: llama_tensor_get_type_impl, OUTPUT || has_tied_embeddings && TOKEN_EMBD)
    embd = base
    if quantized:
        embd = "Q8_0" if base == "Q8_0" or h % GGML_BLOCKS[base][0] else "Q6_K"
    out["token_embd.weight"] = (_fit(embd, h) if quantized else embd, (int(text["vocab_size"]), h))
    out["output_norm.weight"] = ("F32", (1, h))
    for i in range(n):
        b = f"blk.{i}."
        mats = {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
                "ffn_gate": (ff, h), "ffn_up": (ff, h), "ffn_down": (h, ff)}
        for name, shape in mats.items():
            kind = base
            if precision == "q4_k_m" and name in ("attn_v", "ffn_down") and _more_bits(i, n):
                kind = "Q6_K"
            out[b + name + ".weight"] = (_fit(kind, shape[1]) if quantized else kind, shape)
        for name, width in (("attn_norm", h), ("attn_q_norm", int(text["head_dim"])),
                            ("attn_k_norm", int(text["head_dim"])), ("post_attention_norm", h),
                            ("ffn_norm", h), ("post_ffw_norm", h)):
            out[b + name + ".weight"] = ("F32", (1, width))
    return out


def gguf_decoder_bytes(text: dict[str, Any], precision: str) -> int:
    """Bytes of the decoder GGUF of `precision` for a text config summary (the manifest's `text`)."""
    total = METADATA_BYTES
    for kind, (rows, cols) in tensor_types(text, precision).values():
        block, size = GGML_BLOCKS[kind]
        total += rows * (cols // block) * size
    return total


def load_figures(config: dict[str, Any], precision: str, n_ctx: int = 4096, n_batch: int = 512) -> dict[str, int]:
    """What loading the decoder of `precision` needs (weights, KV cache, activations), from the config alone;
    `load` measures the same parts from the real files."""
    kv_bytes = 4 if precision == "f32" else 2
    return memory.estimate(config, gguf_decoder_bytes(config["text"], precision), n_ctx, n_batch, kv_bytes, False,
                           memory.kv_cells(config, n_ctx, n_batch))


def describe(config: dict[str, Any], precisions: list[str], n_ctx: int = 4096) -> str:
    """One line: per precision, the file and what a load at `n_ctx` needs."""
    GiB = memory.GiB
    parts = []
    for p in precisions:
        f = load_figures(config, p, n_ctx)
        parts.append(f"{p} {f['weights'] / GiB:.1f} GiB file, {sum(f.values()) / GiB:.1f} GiB to load")
    return "; ".join(parts) + f" (context {n_ctx})"
