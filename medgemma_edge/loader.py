"""`load()`: a bundle (or a bare decoder GGUF) to a ready Pipeline, verified and consistency-checked."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from medgemma_edge import memory
from medgemma_edge.bundle import Artifact, Bundle, open_bundle
from medgemma_edge.chat import IMAGE_TOKEN_ID
from medgemma_edge.decoder_llama import LlamaDecoder
from medgemma_edge.decoder_onnx import OnnxDecoder
from medgemma_edge.encoder_mtmd import MtmdEncoder
from medgemma_edge.encoder_onnx import OnnxEncoder
from medgemma_edge.errors import UserError
from medgemma_edge.pipeline import Pipeline

log = logging.getLogger(__name__)

# When the caller names no artifact: smallest faithful first for the decoder, most faithful
# affordable first for the encoder (vision is where quantization hurts most).
DECODER_PREFERENCE = ("gguf:q4_k_m", "gguf:q8_0", "gguf:q4_0", "gguf:f16", "gguf:bf16", "gguf:f32",
                      "onnx:int4", "onnx:int8", "onnx:fp32")
ENCODER_PREFERENCE = ("gguf:f16", "onnx:int8_static", "onnx:int8", "gguf:q8_0", "onnx:fp16", "gguf:f32", "onnx:fp32")


def _choose(bundle: Bundle, kind: str, asked: str | None, preference: tuple[str, ...]) -> Artifact:
    if asked:
        return bundle.find(kind, asked)
    have = {a.id: a for a in bundle.artifacts if a.kind == kind}
    for candidate in preference:
        if candidate in have:
            return have[candidate]
    raise UserError(f"{bundle.dir}: the bundle has no usable {kind} artifact; re-run `medgemma-edge convert`")


def _check_hub_id(bundle_dir: str | Path) -> None:
    text = str(bundle_dir)
    if (not Path(text).exists() and text.count("/") == 1 and not text.startswith((".", "/", "~"))
            and not Path(text).parent.exists()):  # `bundles/tiny` with a local `bundles/` is a path typo
        raise UserError(
            f"{text}: looks like a model-hub id, and medgemma-edge never downloads; copy the checkpoint to this "
            f"machine and run `medgemma-edge convert CHECKPOINT_DIR -o BUNDLE_DIR`, then pass --bundle BUNDLE_DIR"
        )


def _vocab_artifact(bundle: Bundle) -> Artifact:
    """The smallest GGUF decoder: its vocabulary tokenizes for every backend, and mtmd needs it."""
    ggufs = sorted((a for a in bundle.artifacts if a.kind == "decoder" and a.format == "gguf"), key=lambda a: a.size)
    if not ggufs:
        raise UserError(f"{bundle.dir}: no GGUF decoder to take the tokenizer from; convert with at least one --gguf precision")
    return ggufs[0]


def _vocab_gguf(bundle: Bundle) -> Path:
    return bundle.path(_vocab_artifact(bundle))


def _decoder(bundle: Bundle, a: Artifact, n_ctx: int, n_batch: int, n_threads: int | None,
             providers: list[str] | None) -> Any:
    if a.format == "onnx":
        return OnnxDecoder(bundle.path(a), bundle.config, _vocab_gguf(bundle), n_ctx=n_ctx, providers=providers,
                           n_threads=n_threads)
    return LlamaDecoder(bundle.path(a), n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, kv_f32=a.precision == "f32")


def _encoder(bundle: Bundle, a: Artifact, n_embd: int, n_threads: int | None, providers: list[str] | None) -> Any:
    if a.format == "onnx":
        return OnnxEncoder(bundle.path(a), n_embd, int(bundle.config["tokens_per_image"]), providers=providers,
                           n_threads=n_threads)
    return MtmdEncoder(bundle.path(a), _vocab_gguf(bundle), n_embd, n_threads=n_threads)


def load(bundle_dir: str | Path, encoder: str | None = None, decoder: str | None = None, *, n_ctx: int = 4096,
         n_threads: int | None = None, verify: bool = True, text_only: bool = False, force: bool = False,
         memory_limit: int | None = None, providers: list[str] | None = None) -> Pipeline:
    """Compose any encoder artifact with any decoder artifact of a bundle (`gguf:f16`, `onnx:int8`, ...).

    They meet only through embeddings. Refuses (unless `force`) when the estimated memory exceeds
    what is available, or `memory_limit` bytes. `providers` are ONNX Runtime execution providers
    (default: CUDA when onnxruntime-gpu sees a GPU, else CPU).
    """
    t0 = time.perf_counter()
    _check_hub_id(bundle_dir)
    bundle = open_bundle(bundle_dir)
    cfg = bundle.config
    dec_a = _choose(bundle, "decoder", decoder, DECODER_PREFERENCE)
    enc_a = None if text_only else _choose(bundle, "encoder", encoder, ENCODER_PREFERENCE)
    chosen = [a for a in (dec_a, enc_a) if a is not None]
    if dec_a.format == "onnx" or (enc_a is not None and enc_a.format == "gguf"):
        vocab = _vocab_artifact(bundle)  # its vocabulary tokenizes (and mtmd reads it): verify it too
        chosen += [] if vocab in chosen else [vocab]
    if verify:
        bundle.verify(chosen)
    else:  # the caller's choice (--no-verify warns in the CLI) or it verified them itself (bench, validate)
        log.info("artifacts used without re-hashing")
    tpi = int(cfg["tokens_per_image"])
    n_batch = max(512, tpi)
    kv_bytes = 4 if dec_a.precision == "f32" or dec_a.format == "onnx" else 2  # ONNX keeps an fp32 cache
    weights = sum(a.total_size for a in (dec_a, enc_a) if a is not None)
    need = memory.estimate(cfg, weights, n_ctx, n_batch, kv_bytes, enc_a is not None)
    memory.preflight(need, memory_limit, force, str(bundle.dir))
    dec = _decoder(bundle, dec_a, n_ctx, n_batch, n_threads, providers)
    if dec.n_embd != cfg["text"]["hidden_size"] or dec.n_vocab != cfg["text"]["vocab_size"]:
        raise UserError(f"{bundle.path(dec_a)}: decoder shape (hidden {dec.n_embd}, vocab {dec.n_vocab}) differs "
                        f"from the manifest's; the bundle was mixed from different models, convert again")
    enc = _encoder(bundle, enc_a, dec.n_embd, n_threads, providers) if enc_a else None
    info: dict[str, Any] = {
        "bundle": str(bundle.dir), "bundle_id": bundle.manifest_sha256,
        "decoder": dec_a.id, "encoder": enc_a.id if enc_a else None,
        "decoder_sha256": dec_a.sha256, "encoder_sha256": enc_a.sha256 if enc_a else None,
        "threads": n_threads, "providers": {k: getattr(v, "providers", ["llama.cpp"]) for k, v in
                                            (("decoder", dec), ("encoder", enc)) if v is not None},
        "load_s": time.perf_counter() - t0,
    }
    log.info("loaded %s (decoder %s, encoder %s) in %.2fs", bundle.dir, dec_a.id, info["encoder"], info["load_s"])
    return Pipeline(dec, enc, image_size=int(cfg["vision"]["image_size"]), tokens_per_image=tpi,
                    eos_ids=cfg["eos_token_ids"], info=info, detokenizer=dec.detokenizer)


def load_decoder_gguf(path: str | Path, *, n_ctx: int = 4096, n_threads: int | None = None) -> Pipeline:
    """Text-only pipeline over any Gemma 3 decoder GGUF (e.g. the real Gemma 3 270M)."""
    t0 = time.perf_counter()
    p = Path(path)
    if not p.is_file():
        _check_hub_id(path)
        raise UserError(f"{p}: decoder GGUF not found; check the path")
    dec = LlamaDecoder(p, n_ctx=n_ctx, n_threads=n_threads)
    info = {"decoder_gguf": str(p), "decoder": "gguf", "encoder": None, "load_s": time.perf_counter() - t0}
    return Pipeline(dec, None, image_size=0, tokens_per_image=0, eos_ids=(1, 106), info=info,
                    detokenizer=dec.detokenizer)


__all__ = ["load", "load_decoder_gguf", "IMAGE_TOKEN_ID"]
