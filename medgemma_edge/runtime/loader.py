"""`load()`: a bundle (or a bare decoder GGUF) to a ready Pipeline, verified and consistency-checked."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medgemma_edge.backends.llama_cpp.checks import DecoderShape
from medgemma_edge.backends.llama_cpp.decoder import LlamaModel
from medgemma_edge.backends.llama_cpp.mtmd import MtmdEncoder
from medgemma_edge.backends.onnx.decoder import OnnxDecoderModel, binds_in_place
from medgemma_edge.backends.onnx.session import default_providers
from medgemma_edge.backends.onnx.vision import OnnxEncoder
from medgemma_edge.backends.openvino.vision import OpenVinoEncoder, require_openvino
from medgemma_edge.bundle import Artifact, Bundle, open_bundle
from medgemma_edge.bundle.precisions import DEFAULT_ORDER
from medgemma_edge.errors import UserError
from medgemma_edge.runtime import memory
from medgemma_edge.runtime.caches import DEFAULT_IMAGE_CACHE_BYTES, ImageCache
from medgemma_edge.runtime.embedding_store import DEFAULT_STORE_BYTES, EmbeddingStore
from medgemma_edge.runtime.pipeline import ModelFacts, Pipeline, no_vision
from medgemma_edge.runtime.protocols import Decoder
from medgemma_edge.runtime.template import Markers

log = logging.getLogger(__name__)

GEMMA3_EOS = (1, 106)


def choose(bundle: Bundle, kind: str, asked: str | None) -> Artifact:
    """The artifact asked for, or the first of the default order that the bundle has."""
    if asked is not None:  # "" is a typo to refuse, not a request for the default
        return bundle.find(kind, asked)
    have = {a.id: a for a in bundle.artifacts if a.kind == kind}
    for candidate in DEFAULT_ORDER[kind]:
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


def decoder_shape(cfg: dict[str, Any]) -> DecoderShape:
    """The decoder shape the manifest records, which every GGUF of the bundle must have."""
    t = cfg["text"]
    return DecoderShape(t["hidden_size"], t["intermediate_size"], t["num_layers"], t["num_heads"],
                        t["num_kv_heads"], t["head_dim"], t["vocab_size"], t["sliding_window"])


def _decoder(bundle: Bundle, a: Artifact, n_ctx: int, n_batch: int, n_threads: int | None,
             providers: list[str] | None) -> tuple[Any, Callable[[], Decoder], Any, list[Any]]:
    """(model, context factory, tokenizer, objects the pipeline must free)."""
    shape = decoder_shape(bundle.config)
    if a.format == "onnx":
        model = OnnxDecoderModel(bundle.path(a), bundle.config, providers=providers, n_threads=n_threads)
        # measured with OpenVINO (benchmarks/README.md, "Execution providers"); the other GPU providers are not
        if model.providers[0] == "OpenVINOExecutionProvider" and a.recipe.get("attention_ops", "fused") == "fused":
            log.warning("%s: its Attention and TensorScatter nodes run on the CPU beside %s; for that provider "
                        "convert with --onnx-attention portable", a.id, model.providers[0])
        # one tokenizer for every backend: llama.cpp's, from the bundle's GGUF read vocabulary-only
        vocab = LlamaModel(bundle.path(bundle.vocab_artifact()), vocab_only=True, expect=shape)
        return model, lambda: model.new_context(n_ctx), vocab.tokenizer, [vocab]
    llama = LlamaModel(bundle.path(a), expect=shape)
    kv_f32 = a.precision == "f32"
    return llama, lambda: llama.new_context(n_ctx, n_batch, n_threads, kv_f32), llama.tokenizer, []


def _encoder(bundle: Bundle, a: Artifact, n_embd: int, n_threads: int | None, providers: list[str] | None) -> Any:
    v = bundle.config["vision"]
    if a.format == "ov":  # OpenVINO's CPU plugin: ONNX Runtime's providers do not apply
        return OpenVinoEncoder(bundle.path(a), n_embd, int(bundle.config["tokens_per_image"]), n_threads=n_threads,
                               mean=v.get("image_mean", (0.5,) * 3), std=v.get("image_std", (0.5,) * 3),
                               precision_hint=str(a.recipe.get("inference_precision", "bf16")))
    if a.format == "onnx":
        return OnnxEncoder(bundle.path(a), n_embd, int(bundle.config["tokens_per_image"]), providers=providers,
                           n_threads=n_threads, mean=v.get("image_mean", (0.5,) * 3), std=v.get("image_std", (0.5,) * 3))
    return MtmdEncoder(bundle.path(a), bundle.path(bundle.vocab_artifact()), n_embd, v,
                       int(bundle.config["tokens_per_image"]), n_threads=n_threads)


def load(bundle_dir: str | Path, encoder: str | None = None, decoder: str | None = None, *, n_ctx: int = 4096,
         n_threads: int | None = None, verify: bool = True, text_only: bool = False, force: bool = False,
         memory_limit: int | None = None, providers: list[str] | None = None,
         image_cache_bytes: int = DEFAULT_IMAGE_CACHE_BYTES, slices: memory.SliceFit | None = None,
         encode_batch: int | None = None, contexts: int = 1, cache_dir: str | Path | None = None,
         cache_bytes: int = DEFAULT_STORE_BYTES) -> Pipeline:
    """Compose any encoder artifact with any decoder artifact of a bundle (`gguf:f16`, `onnx:int8`, ...).

    They meet only through embeddings. Refuses (unless `force`) when the estimated memory exceeds
    what is available, or `memory_limit` bytes. `providers` are ONNX Runtime execution providers
    (default: CUDA when onnxruntime-gpu sees a GPU, else CPU). `image_cache_bytes` bounds the
    image-embedding cache (least recently used dropped first). `slices`: the context is a study's, and a
    refusal names the slice count that would fit. `encode_batch`: images per ONNX encoder call (default:
    from the memory available when encoding). `contexts`: decoder contexts the caller will hold at once (a
    server's slots), each counted in the memory preflight. `cache_dir`: keep image embeddings on disk there too
    (runtime/embedding_store.py, at most `cache_bytes`), shared by every process on this machine. A text-only
    bundle (MedGemma 27B text) loads without an encoder whatever `text_only` says; naming one is refused.
    """
    t0 = time.perf_counter()
    _check_hub_id(bundle_dir)
    bundle = open_bundle(bundle_dir)
    cfg = bundle.config
    store = EmbeddingStore(cache_dir, cache_bytes) if cache_dir is not None else None  # refused before any load
    dec_a = choose(bundle, "decoder", decoder)
    if not bundle.has_vision and encoder:
        raise no_vision(str(bundle.dir), f"no encoder {encoder!r}; drop --encoder")
    # a text-only bundle loads without an encoder whatever text_only says: images are refused when given
    enc_a = None if text_only or not bundle.has_vision else choose(bundle, "encoder", encoder)
    if enc_a is not None and enc_a.format == "ov":
        require_openvino(f"{bundle.dir}: encoder {enc_a.id}")
    chosen = [a for a in (dec_a, enc_a) if a is not None]
    if dec_a.format == "onnx" or (enc_a is not None and enc_a.format == "gguf"):
        vocab = bundle.vocab_artifact()  # its vocabulary tokenizes (and mtmd reads it): verify it too
        chosen += [] if vocab in chosen else [vocab]
    if verify:
        bundle.verify(chosen)
    else:  # the caller's choice (--no-verify warns in the CLI) or it verified them itself (bench, validate)
        bundle.check_files(chosen)  # still: regular files of the recorded size, never a pipe that blocks
        log.info("artifacts used without re-hashing")
    tpi = int(cfg["tokens_per_image"]) if enc_a else 0
    n_batch = max(512, tpi)
    kv_bytes = 4 if dec_a.precision == "f32" or dec_a.format == "onnx" else 2  # ONNX keeps an fp32 cache
    if dec_a.format == "onnx" and not binds_in_place(providers or default_providers()):
        kv_bytes *= 2  # off the CPU provider each cache has a second buffer the calls alternate with
    weights = sum(a.total_size for a in (dec_a, enc_a) if a is not None)
    backend = "onnx" if dec_a.format == "onnx" else "llama.cpp"

    def need_for(ctx: int) -> dict[str, int]:  # what the backends allocate: sliding layers keep only their window
        cells = memory.kv_cells(cfg, ctx, n_batch, backend)
        need = memory.estimate(cfg, weights, ctx, n_batch, kv_bytes, enc_a is not None, cells)
        if contexts > 1:  # a server's slots: each more context is its own KV cache, logits and compute buffers
            more = memory.estimate(cfg, 0, ctx, n_batch, kv_bytes, False, cells)
            need = {k: v + (contexts - 1) * more[k] for k, v in need.items()}
        return need

    if slices is None:
        memory.preflight(need_for(n_ctx), memory_limit, force, str(bundle.dir))
    else:
        memory.preflight_slices(need_for, slices, memory_limit, force, str(bundle.dir))
    model, make_context, tokenizer, owned = _decoder(bundle, dec_a, n_ctx, n_batch, n_threads, providers)
    enc = None
    try:
        if model.n_embd != cfg["text"]["hidden_size"] or model.n_vocab != cfg["text"]["vocab_size"]:
            raise UserError(f"{bundle.path(dec_a)}: decoder shape (hidden {model.n_embd}, vocab {model.n_vocab}) "
                            f"differs from the manifest's; the bundle was mixed from different models, convert again")
        enc = _encoder(bundle, enc_a, model.n_embd, n_threads, providers) if enc_a else None
        spare = make_context()  # created now: a context that cannot be made (memory) fails the load, not a question
    except BaseException:
        for part in (enc, model, *owned):
            if part is not None:
                part.close()
        raise
    info: dict[str, Any] = {
        "bundle": str(bundle.dir), "bundle_id": bundle.manifest_sha256,
        "decoder": dec_a.id, "encoder": enc_a.id if enc_a else None, "has_vision": bundle.has_vision,
        "decoder_sha256": dec_a.sha256, "encoder_sha256": enc_a.sha256 if enc_a else None,
        "threads": n_threads, "providers": {k: v.providers for k, v in (("decoder", model), ("encoder", enc))
                                            if v is not None},
        "load_s": time.perf_counter() - t0,
    }
    log.info("loaded %s (decoder %s, encoder %s) in %.2fs", bundle.dir, dec_a.id, info["encoder"], info["load_s"])
    v = cfg.get("vision") or {}
    facts = ModelFacts(image_size=int(v.get("image_size", 0)), tokens_per_image=tpi,
                       eos_ids=frozenset(cfg["eos_token_ids"]),
                       markers=Markers(int(cfg.get("boi_token_id", 255999)), int(cfg.get("eoi_token_id", 256000))),
                       n_ctx=n_ctx, vision_bytes_per_image=memory.vision_bytes_per_image(cfg) if enc else 0)
    pipe = Pipeline(model, make_context, tokenizer, enc, facts, info, ImageCache(image_cache_bytes), owned, spare)
    pipe.encode_batch = encode_batch
    pipe.store = store if enc is not None else None
    return pipe


def load_decoder_gguf(path: str | Path, *, n_ctx: int = 4096, n_threads: int | None = None) -> Pipeline:
    """Text-only pipeline over any Gemma 3 decoder GGUF (e.g. the real Gemma 3 270M)."""
    t0 = time.perf_counter()
    p = Path(path)
    if not p.is_file():
        _check_hub_id(path)
        raise UserError(f"{p}: decoder GGUF not found; check the path")
    model = LlamaModel(p)
    try:
        spare = model.new_context(n_ctx, 512, n_threads)
    except BaseException:
        model.close()
        raise
    info = {"decoder_gguf": str(p), "decoder": "gguf", "encoder": None, "load_s": time.perf_counter() - t0}
    return Pipeline(model, lambda: model.new_context(n_ctx, 512, n_threads), model.tokenizer, None,
                    ModelFacts(0, 0, frozenset(GEMMA3_EOS), n_ctx=n_ctx), info, spare=spare)
