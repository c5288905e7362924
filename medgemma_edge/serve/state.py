"""What one server holds: its settings, the pipeline (None while loading), the slots, metrics and audit,
and the blocking steps of a request (decode images, encode, tokenize), which run in worker threads."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medgemma_edge.errors import PromptTooLong, UserError
from medgemma_edge.inputs.images import resize_square
from medgemma_edge.inputs.uploads import Upload, image_url
from medgemma_edge.runtime.caches import Atom, positions
from medgemma_edge.runtime.pipeline import Pipeline
from medgemma_edge.runtime.sampling import SamplingParams
from medgemma_edge.runtime.template import Part, render_conversation
from medgemma_edge.runtime.thinking import thinking_system
from medgemma_edge.serve.auth import Keys
from medgemma_edge.serve.limits import Limits
from medgemma_edge.serve.metrics import Metrics
from medgemma_edge.serve.records import AuditTrail
from medgemma_edge.serve.requests import ChatRequest, Conversation, conversation, fit_to_context
from medgemma_edge.serve.slots import Generation, SlotPool

log = logging.getLogger(__name__)
DECODES_AT_ONCE = 2  # images decoded at the same time: a 67 MP image is ~270 MB while it decodes


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    limits: Limits = field(default_factory=Limits)
    api_keys: tuple[str, ...] = ()
    allow_dirs: tuple[Path, ...] = ()
    cors_origins: tuple[str, ...] = ()
    audit_log: Path | None = None
    audit_include_text: bool = False
    model_id: str = "medgemma"


@dataclass
class Prepared:
    """A request ready for a slot: parts and images for `stream_parts`, the atoms that choose the slot."""

    conv: Conversation
    parts: list[Part]
    images: list[Image.Image]
    atoms: list[Atom]
    n_prompt: int
    n_image_tokens: int
    sampling: SamplingParams
    thinking: bool = False  # the system text asks the model to think; its thought is split off
    prepare_ms: float = 0.0  # arrival to ready for a slot: images decoded and encoded, text tokenized


class ServerState:
    def __init__(self, config: ServeConfig, load: Callable[[], Pipeline], audit: AuditTrail) -> None:
        self.config = config
        self.keys = Keys(list(config.api_keys))
        self.audit = audit
        self._load = load
        self.pipe: Pipeline | None = None
        self.pool: SlotPool | None = None
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()  # set when loading ended, either way
        self.metrics = Metrics(lambda: self.pipe.encoder_calls if self.pipe is not None else 0)
        self.metrics.slots.set(config.limits.parallel)
        self.generations: set[Generation] = set()
        self._decodes = threading.Semaphore(DECODES_AT_ONCE)
        self.started = time.time()

    @property
    def ready(self) -> bool:
        return self.pool is not None

    # -- loading (a thread of its own: /health answers 503 meanwhile) --------------------------
    def load(self) -> None:
        try:
            pipe = self._load()
            try:
                caches = [pipe.new_cache() for _ in range(self.config.limits.parallel)]
                for cache in caches:  # every context now: one that cannot be made fails the start, not a request
                    _ = cache.decoder
            except BaseException:
                pipe.close()
                raise
            self.pipe = pipe
            self.pool = SlotPool(caches, self.config.limits.max_queue, self._gauges)
            log.info("ready: %d slot(s) of %d tokens", len(caches), pipe.facts.n_ctx)
        except BaseException as exc:  # noqa: BLE001 - reported by the server, which then stops
            self.load_error = exc
        finally:
            self.loaded.set()

    def _gauges(self, busy: int, queued: int) -> None:
        self.metrics.slots_busy.set(busy)
        self.metrics.queue_depth.set(queued)

    # -- blocking request steps (worker threads) ----------------------------------------------
    def upload(self, url: str, name: str) -> Upload:
        """One image URL, checked and decoded, then kept only as the square the encoder sees."""
        assert self.pipe is not None
        with self._decodes:
            up = image_url(url, name, self.config.limits.max_body_bytes, self.config.allow_dirs)
            size = self.pipe.facts.image_size
            if not size:  # a text-only model: refused by the pipeline, with its own message
                return up
            square = Image.fromarray(resize_square(up.image, size))
        return Upload(square, up.sha256, up.kind)

    def conversation(self, req: ChatRequest) -> Conversation:
        return conversation(req, self.upload, self.config.limits.max_images)

    def prepare(self, conv: Conversation, sampling: SamplingParams, asked: bool, thinking: bool = False) -> Prepared:
        """Render, encode (image cache first) and tokenize; refuse what cannot fit before any slot is taken."""
        pipe = self.pipe
        assert pipe is not None
        system = thinking_system(pipe.tokenizer, conv.system, "this model") if thinking else conv.system
        n_ctx, tpi = pipe.facts.n_ctx, pipe.facts.tokens_per_image
        if len(conv.images) * tpi > n_ctx:
            raise PromptTooLong(f"{len(conv.images)} images need {len(conv.images) * tpi} tokens, more than the "
                                f"context of {n_ctx}; ask about fewer images at a time")
        parts = render_conversation(conv.turns, system, pipe.facts.markers)
        images = [u.image for u in conv.images]
        spans = pipe.encode_images(images)
        atoms = pipe.atoms(parts, spans)
        n_prompt = positions(atoms)
        if n_prompt > n_ctx:
            raise PromptTooLong(f"the conversation needs {n_prompt} tokens, more than the context of {n_ctx}; "
                                f"shorten it, or restart the server with a larger --ctx")
        sampling = fit_to_context(sampling, asked, n_prompt, n_ctx)
        return Prepared(conv, parts, images, atoms, n_prompt, sum(len(s) for s in spans), sampling, thinking)

    def preview_png(self, url: str) -> bytes:
        """What the model will see for an image (as `render` writes it), as PNG bytes."""
        pipe = self.pipe
        assert pipe is not None
        if not pipe.facts.image_size:
            raise UserError("this model has no vision part (a text-only bundle), so there is nothing to preview")
        up = self.upload(url, "image_url")
        buf = io.BytesIO()
        Image.fromarray(np.asarray(up.image)).save(buf, format="PNG")
        return buf.getvalue()

    def model_card(self) -> dict[str, Any]:
        pipe = self.pipe
        artifacts: list[dict[str, Any]] = []
        if pipe is not None and pipe.info.get("bundle"):
            from medgemma_edge.bundle import open_bundle

            used = {("decoder", pipe.info.get("decoder")), ("encoder", pipe.info.get("encoder"))}
            for a in open_bundle(pipe.info["bundle"]).artifacts:
                artifacts.append({"kind": a.kind, "id": a.id, "sha256": a.sha256, "size": a.size,
                                  "loaded": (a.kind, a.id) in used})
        return {"id": self.config.model_id, "created": int(self.started), "artifacts": artifacts}

    def close(self, wait_s: float = 10.0) -> None:
        """Stop every generation, then free the pipeline once no thread uses it (else leave it to the exit)."""
        for gen in list(self.generations):
            gen.cancel()
        deadline = time.monotonic() + wait_s
        for gen in list(self.generations):
            gen.ended.wait(max(0.0, deadline - time.monotonic()))
        if self.pool is not None:
            for slot in self.pool.slots:
                slot.worker.shutdown(wait=False)
        if self.pipe is not None and all(g.ended.is_set() for g in self.generations):
            self.pipe.close()
            self.pipe = None
