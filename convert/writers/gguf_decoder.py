"""Gemma 3 decoder -> GGUF (architecture `gemma3`). A base GGUF is written here in the checkpoint's own
type (bf16 for every published MedGemma, so nothing is lost) or f32 when f32 is asked for; every other
precision is derived from it by llama.cpp's own quantizer, so the bytes match what llama.cpp users
get. At 27B an f32 scratch file would be 108 GB; the bf16 one is half that."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf

from convert.checkpoint import Checkpoint, iter_layers
from convert.models.gemma3 import DECODER_TENSORS, MedGemmaSpec
from convert.registry import read_json
from convert.writers.gguf_common import Q, TensorJob, add_one, write_gguf
from medgemma_edge.errors import UserError


# precision name -> llama.cpp file type (llama_ftype); the base (f32 or the checkpoint's type) is written directly.
DECODER_PRECISIONS: dict[str, int] = {
    "f32": int(gguf.LlamaFileType.ALL_F32),
    "f16": int(gguf.LlamaFileType.MOSTLY_F16),
    "bf16": int(gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": int(gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": int(gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_k_m": int(gguf.LlamaFileType.MOSTLY_Q4_K_M),
}


def marker_ids(spec: Any) -> tuple[int, ...]:
    """The ids the template places itself and user text must never produce: image delimiters, image token."""
    return tuple(getattr(spec, k) for k in ("boi_token_id", "eoi_token_id", "image_token_id") if hasattr(spec, k))


# safetensors dtype -> the base GGUF's type for matrices that keep it exactly
_BASE_TYPES = {"BF16": ("bf16", Q.BF16), "F16": ("f16", Q.F16)}


def base_type(ckpt: Checkpoint, want_f32: bool) -> tuple[str, gguf.GGMLQuantizationType]:
    """(precision name, GGML type) of the base GGUF: f32 when asked, else the checkpoint's matrix type."""
    if want_f32:
        return "f32", Q.F32
    return _BASE_TYPES.get(ckpt.dtype("text.embed_tokens.weight"), ("f32", Q.F32))


def decoder_jobs(ckpt: Checkpoint, spec: MedGemmaSpec, matrix_type: gguf.GGMLQuantizationType = Q.F32) -> list[TensorJob]:
    names = ckpt.names("text")
    jobs: list[TensorJob] = []
    layers = list(iter_layers([n[len("text."):] for n in names], "layers"))
    if layers != list(range(spec.text.num_layers)):
        raise UserError(f"{ckpt.dir}: decoder has layers {layers[:3]}..{layers[-3:]}, config says {spec.text.num_layers}")
    for src_t, dst_t in DECODER_TENSORS.items():
        for bid in layers if "{bid}" in src_t else [None]:
            src = "text." + src_t.format(bid=bid)
            if not ckpt.has(src):
                raise UserError(f"{ckpt.dir}: tensor {src!r} is missing; the checkpoint is incomplete")
            # every Gemma RMSNorm (layer norms, q/k norms, final norm) is applied as (1 + w), kept F32 (as
            # llama.cpp's converter keeps 1-D tensors): 1 + w in bf16 would lose w's low bits
            norm = src.endswith("norm.weight")
            jobs.append(TensorJob(src, dst_t.format(bid=bid), Q.F32 if norm else matrix_type, add_one if norm else None))
    mapped = {j.src for j in jobs}
    extra = sorted(set(names) - mapped)
    if extra:
        raise UserError(f"{ckpt.dir}: decoder tensor {extra[0]!r} has no GGUF mapping; unsupported checkpoint variant")
    return jobs


def _vocab(ckpt_dir: Path, vocab_size: int, marker_ids: Sequence[int]) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types for the GGUF, from tokenizer.model plus the added tokens.

    Piece types come from the SentencePiece model itself (its user-defined pieces, e.g. whitespace runs,
    stay user-defined even when tokenizer_config.json declares no added tokens), then the added tokens.
    `marker_ids` (image delimiters and the image token) are typed CONTROL whatever the files say: the
    template places them by id, and llama.cpp would match a user-defined one inside user text.
    ref: llama.cpp conversion/base.py _create_vocab_sentencepiece (same token-type numbering as SentencePiece's).
    """
    from sentencepiece import sentencepiece_model_pb2

    path = ckpt_dir / "tokenizer.model"
    if not path.is_file():
        raise UserError(f"{path}: missing; the Gemma 3 SentencePiece tokenizer is required to convert")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError
        raise UserError(f"{path}: not a readable SentencePiece model ({type(exc).__name__}); copy the checkpoint again") from exc
    if not proto.pieces:
        raise UserError(f"{path}: a SentencePiece model with no pieces; copy the checkpoint again")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i, piece in enumerate(proto.pieces[:vocab_size]):
        tokens[i], scores[i], types[i] = piece.piece.encode(), piece.score, int(piece.type)
    cfg_path = ckpt_dir / "tokenizer_config.json"
    try:
        for tid, tok in read_json(cfg_path).get("added_tokens_decoder", {}).items():
            i = int(tid)
            if i < vocab_size:
                tokens[i], scores[i] = str(tok["content"]).encode(), -1000.0
                types[i] = int(gguf.TokenType.CONTROL if tok.get("special") else gguf.TokenType.USER_DEFINED)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(f"{cfg_path}: malformed added_tokens_decoder ({exc!r}); copy the checkpoint again") from exc
    for i in marker_ids:
        if 0 <= i < vocab_size:
            types[i] = int(gguf.TokenType.CONTROL)
    return tokens, scores, types


def _chat_template(ckpt_dir: Path) -> str | None:
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        path = ckpt_dir / name
        if path.is_file():
            return path.read_text(encoding="utf-8") if name.endswith(".jinja") else read_json(path).get("chat_template")
    return None


def write_decoder_base(ckpt: Checkpoint, spec: MedGemmaSpec, out: Path, precision: str = "f32",
                       progress: bool = True) -> None:
    """The decoder GGUF with matrices in `precision` (f32, bf16 or f16) and 1-D tensors in f32."""
    t = spec.text
    w = gguf.GGUFWriter(path=None, arch="gemma3")
    w.add_name("MedGemma decoder")
    w.add_file_type(DECODER_PRECISIONS[precision])
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_block_count(t.num_layers)
    w.add_head_count(t.num_heads)
    w.add_head_count_kv(t.num_kv_heads)
    w.add_key_length(t.head_dim)
    w.add_value_length(t.head_dim)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_rope_freq_base(t.rope_theta)
    w.add_rope_freq_base_swa(t.rope_local_theta)
    if t.rope_linear_factor:
        # llama.cpp applies the trained scale to global layers only, as transformers does
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(t.rope_linear_factor)
    w.add_sliding_window(t.sliding_window)
    w.add_sliding_window_pattern(t.is_swa)  # explicit per-layer flags: any layer mix converts
    if t.final_logit_softcapping:
        w.add_final_logit_softcapping(t.final_logit_softcapping)
    tokens, scores, types = _vocab(ckpt.dir, t.vocab_size, marker_ids(spec))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_eot_token_id(106)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    if template := _chat_template(ckpt.dir):
        w.add_chat_template(template)
    matrix = {"f32": Q.F32, "bf16": Q.BF16, "f16": Q.F16}[precision]
    write_gguf(out, w, ckpt, decoder_jobs(ckpt, spec, matrix), f"decoder {precision}", progress)


def quantize_decoder(src: Path, out: Path, precision: str, threads: int = 0) -> None:
    """Derive a precision from the base GGUF with llama.cpp's `llama_model_quantize`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = DECODER_PRECISIONS[precision]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise UserError(f"{out}: llama.cpp quantization to {precision} failed (code {rc}); see the log above")
