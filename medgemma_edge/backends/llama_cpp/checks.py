"""What a GGUF must say before llama.cpp or mtmd sees it: llama.cpp trusts its input and aborts the process
(GGML_ASSERT) on shapes it did not expect, so every hyperparameter it reads and every tensor shape is checked
here against the manifest (or, for a bare decoder GGUF, against the header's own hyperparameters).

Shapes are in GGUF order (innermost first), as llama.cpp's own tensor checks write them.
ref: llama.cpp src/llama-model.cpp (LLM_ARCH_GEMMA3 tensors), tools/mtmd/clip.cpp (PROJECTOR_TYPE_GEMMA3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgemma_edge.bundle.gguf_header import GgufHeader, LongArray
from medgemma_edge.errors import UserError

# ggml types our bundles (and llama.cpp's quantizer for them) produce: F32 F16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 K-quants BF16
_TYPES = {0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 15, 30}
_FIX = "re-run `medgemma-edge convert` (the file does not belong to this bundle or was altered)"


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    window: int | None = None


def _int(header: GgufHeader, key: str, path: Path) -> int:
    value = header.get(key)
    if type(value) is not int or not 0 < value < 1 << 31:
        raise UserError(f"{path}: GGUF metadata {key} is {value!r}, not a positive size; {_FIX}")
    return value


def _finite(header: GgufHeader, key: str, path: Path, required: bool = True) -> None:
    value = header.get(key)
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{path}: GGUF metadata {key} is {value!r}, not a positive finite number; {_FIX}")


def _same(path: Path, what: str, have: Any, want: Any) -> None:
    if have != want:
        raise UserError(f"{path}: {what} is {have} but the bundle's manifest says {want}; {_FIX}")


def _tensors(header: GgufHeader, path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    for name, dims in expected.items():
        info = header.tensors.get(name)
        if info is None:
            raise UserError(f"{path}: tensor {name} is missing; {_FIX}")
        if info.dims != dims:
            raise UserError(f"{path}: tensor {name} has shape {list(info.dims)}, expected {list(dims)}; {_FIX}")
        if info.type not in _TYPES or info.block is None or dims[0] % info.block:
            raise UserError(f"{path}: tensor {name} has storage type {info.type}, which does not fit its shape; {_FIX}")


def decoder_shape(header: GgufHeader, path: Path) -> DecoderShape:
    """The Gemma 3 hyperparameters llama.cpp reads, each checked to be a sane size."""
    a = "gemma3"
    shape = DecoderShape(
        hidden=_int(header, f"{a}.embedding_length", path), ffn=_int(header, f"{a}.feed_forward_length", path),
        layers=_int(header, f"{a}.block_count", path), heads=_int(header, f"{a}.attention.head_count", path),
        kv_heads=_int(header, f"{a}.attention.head_count_kv", path),
        head_dim=_int(header, f"{a}.attention.key_length", path),
        vocab=tokens.length if isinstance(tokens := header.get("tokenizer.ggml.tokens"), LongArray) else -1,
        window=header.get(f"{a}.attention.sliding_window"))
    _int(header, f"{a}.context_length", path)
    if shape.vocab < 1:
        raise UserError(f"{path}: GGUF has no tokenizer.ggml.tokens vocabulary; {_FIX}")
    _same(path, "attention.value_length", header.get(f"{a}.attention.value_length"), shape.head_dim)
    if shape.heads % shape.kv_heads:
        raise UserError(f"{path}: {shape.heads} attention heads do not group over {shape.kv_heads} KV heads; {_FIX}")
    for key in (f"{a}.attention.layer_norm_rms_epsilon", f"{a}.rope.freq_base"):
        _finite(header, key, path)
    _finite(header, f"{a}.rope.scaling.factor", path, required=False)
    return shape


def check_decoder(header: GgufHeader, path: Path, want: DecoderShape | None = None) -> DecoderShape:
    """Hyperparameters equal to the manifest's (when given) and every tensor of the shape they imply."""
    have = decoder_shape(header, path)
    if want is not None:
        for field in ("hidden", "ffn", "layers", "heads", "kv_heads", "head_dim", "vocab", "window"):
            _same(path, f"decoder {field}", getattr(have, field), getattr(want, field))
    h, hd = have.hidden, have.head_dim
    expected = {"token_embd.weight": (h, have.vocab), "output_norm.weight": (h,)}
    for i in range(have.layers):
        b = f"blk.{i}."
        expected |= {b + "attn_norm.weight": (h,), b + "attn_q.weight": (h, have.heads * hd),
                     b + "attn_k.weight": (h, have.kv_heads * hd), b + "attn_v.weight": (h, have.kv_heads * hd),
                     b + "attn_output.weight": (have.heads * hd, h), b + "attn_q_norm.weight": (hd,),
                     b + "attn_k_norm.weight": (hd,), b + "post_attention_norm.weight": (h,),
                     b + "ffn_norm.weight": (h,), b + "post_ffw_norm.weight": (h,), b + "ffn_gate.weight": (h, have.ffn),
                     b + "ffn_up.weight": (h, have.ffn), b + "ffn_down.weight": (have.ffn, h)}
    _tensors(header, path, expected)
    return have


def check_mmproj(header: GgufHeader, path: Path, vision: dict[str, Any], n_embd: int, tokens_per_image: int) -> None:
    """A Gemma 3 mmproj whose every hyperparameter mtmd reads matches the manifest's vision part and the
    decoder's width, and whose tensors all have the shapes those imply."""
    if header.get("general.architecture") != "clip" or header.get("clip.projector_type") != "gemma3":
        raise UserError(f"{path}: not a Gemma 3 mmproj (architecture {header.get('general.architecture')!r}, "
                        f"projector {header.get('clip.projector_type')!r}); pass the mmproj from the same conversion")
    v = "clip.vision."
    vh, ff = int(vision["hidden_size"]), int(vision.get("intermediate_size", 0)) or _int(header, v + "feed_forward_length", path)
    size, patch, layers = int(vision["image_size"]), int(vision["patch_size"]), int(vision["num_layers"])
    projection = header.get(v + "projection_dim")
    if projection != n_embd:
        raise UserError(f"{path}: mmproj projects to width {projection} but the decoder's hidden size is "
                        f"{n_embd}: this mmproj belongs to another model")
    for key, want in ((v + "image_size", size), (v + "patch_size", patch), (v + "embedding_length", vh),
                      (v + "feed_forward_length", ff), (v + "block_count", layers),
                      (v + "attention.head_count", int(vision["num_heads"]))):
        _same(path, key, header.get(key), want)
    if vh % int(vision["num_heads"]) or size % patch:
        raise UserError(f"{path}: vision width {vh} / {vision['num_heads']} heads or image {size} / patch {patch} "
                        f"do not divide; {_FIX}")
    side = size // patch
    pool = side // math.isqrt(tokens_per_image) if tokens_per_image else 0
    if pool < 1 or (side // pool) ** 2 != tokens_per_image or side % pool:
        raise UserError(f"{path}: {tokens_per_image} tokens per image do not pool from a {side}x{side} patch grid; {_FIX}")
    _same(path, v + "projector.scale_factor", header.get(v + "projector.scale_factor", 4), pool)
    _finite(header, v + "attention.layer_norm_epsilon", path)
    for key in (v + "image_mean", v + "image_std"):
        values = header.get(key)
        if not isinstance(values, list) or len(values) != 3 or not all(
                isinstance(x, (int, float)) and math.isfinite(x) for x in values) or (key.endswith("std") and 0 in values):
            raise UserError(f"{path}: {key} is {values!r}, not three finite numbers; {_FIX}")
    expected = {"v.patch_embd.weight": (patch, patch, 3, vh), "v.patch_embd.bias": (vh,),
                "v.position_embd.weight": (vh, side * side), "v.post_ln.weight": (vh,), "v.post_ln.bias": (vh,),
                "mm.input_projection.weight": (n_embd, vh), "mm.soft_emb_norm.weight": (vh,)}
    for i in range(layers):
        b = f"v.blk.{i}."
        for t in ("attn_q", "attn_k", "attn_v", "attn_out"):
            expected |= {b + t + ".weight": (vh, vh), b + t + ".bias": (vh,)}
        expected |= {b + "ln1.weight": (vh,), b + "ln1.bias": (vh,), b + "ln2.weight": (vh,), b + "ln2.bias": (vh,),
                     b + "ffn_up.weight": (vh, ff), b + "ffn_up.bias": (ff,),
                     b + "ffn_down.weight": (ff, vh), b + "ffn_down.bias": (vh,)}
    _tensors(header, path, expected)
