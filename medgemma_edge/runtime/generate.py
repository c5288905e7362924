"""Layered generation, as mlx-lm does it: `generate_step` yields token ids, `stream_generate` yields
text chunks (the last one carries the result), `generate` collects them into one GenerationResult.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medgemma_edge.inputs.images import ImageInput
from medgemma_edge.runtime.caches import Atom, PromptCache, positions
from medgemma_edge.runtime.pipeline import Pipeline
from medgemma_edge.runtime.sampling import SamplingParams, sample
from medgemma_edge.runtime.template import Part

NOTICE = "Research use only: not for clinical diagnosis (MedGemma model card, intended use)."


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    image_tokens: int
    stop_reason: str  # "eos" | "length"
    timings: dict[str, float] = field(default_factory=dict)
    reused_tokens: int = 0  # prompt positions served from the KV cache

    def to_json(self, info: dict[str, Any]) -> dict[str, Any]:
        return {
            "text": self.text, "notice": NOTICE, "stop_reason": self.stop_reason,
            "tokens": {"prompt": self.prompt_tokens, "image": self.image_tokens, "generated": len(self.token_ids),
                       "reused": self.reused_tokens},
            "timings": self.timings, **info,
        }


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of streamed text; the last chunk of a stream carries the whole `result`."""

    text: str
    token: int | None  # the token that completed this text; None for the final chunk
    result: GenerationResult | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.result.stop_reason if self.result else None


def generate_step(cache: PromptCache, first_logits: np.ndarray, sampling: SamplingParams,
                  eos_ids: frozenset[int]) -> Iterator[int]:
    """Token ids after a prefill whose last logits row is `first_logits`; stops at EOS (unless ignored)."""
    rng = np.random.default_rng(sampling.seed)
    row = first_logits
    for step in range(sampling.max_new_tokens):
        tok = sample(row, rng, sampling.temperature, sampling.top_k, sampling.top_p)
        if tok in eos_ids and not sampling.ignore_eos:
            return
        yield tok
        if step + 1 < sampling.max_new_tokens:
            row = cache.eval([tok])[-1]


def stream_parts(pipe: Pipeline, parts: Sequence[Part], images: Sequence[ImageInput],
                 sampling: SamplingParams, cache: PromptCache | None = None) -> Iterator[GenerationChunk]:
    """Generate after already rendered parts (a chat session renders whole conversations)."""
    t0 = time.perf_counter()
    spans = pipe.encode_images(images)
    t_enc = time.perf_counter()
    atoms: list[Atom] = pipe.atoms(parts, spans)
    cache = pipe.cache_for(cache)
    tally: dict[str, float] = {}
    logits, reused = cache.sync(atoms, tally)
    t_prefill = time.perf_counter()
    detok = pipe.tokenizer.detokenizer()
    out: list[int] = []
    text: list[str] = []
    t_first = None
    for tok in generate_step(cache, logits[-1], sampling, pipe.facts.eos_ids):
        if t_first is None:
            t_first = time.perf_counter()
        out.append(tok)
        if piece := detok.push(tok):
            text.append(piece)
            yield GenerationChunk(piece, tok)
    t_first = t_first or time.perf_counter()  # EOS first: the first token was still sampled
    stop = "length" if len(out) == sampling.max_new_tokens else "eos"
    tail = detok.flush()
    text.append(tail)
    t_end = time.perf_counter()
    n_prompt, decode_s = positions(atoms), t_end - t_first
    timings = {
        "load_s": pipe.info.get("load_s", 0.0),
        "image_encode_ms": (t_enc - t0) * 1e3,
        "prefill_ms": (t_prefill - t_enc) * 1e3,
        "prefill_tokens_per_s": (n_prompt - reused) / max(t_prefill - t_enc, 1e-9),
        **{f"prefill_{kind}_tokens_per_s": tally.get(f"{kind}_n", 0) / max(tally.get(f"{kind}_s", 0.0), 1e-9)
           for kind in ("text", "image") if tally.get(f"{kind}_n")},
        "time_to_first_token_ms": (t_first - t0) * 1e3,
        "decode_tokens_per_s": (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0,
    }
    n_img = sum(len(s) for s in spans)
    result = GenerationResult("".join(text), out, n_prompt, n_img, stop, timings, reused)
    yield GenerationChunk(tail, None, result)


def stream_generate(pipe: Pipeline, prompt: str, images: Sequence[ImageInput] = (), *, system: str | None = None,
                    sampling: SamplingParams | None = None, cache: PromptCache | None = None,
                    raw: bool = False) -> Iterator[GenerationChunk]:
    """Answer one user turn (or continue `prompt` verbatim with raw=True), chunk by chunk.

    Without a `cache` nothing is reused from an earlier call; pass `pipe.new_cache()` to keep one.
    """
    parts = pipe.parts(prompt, len(images), system, raw)
    yield from stream_parts(pipe, parts, list(images), sampling or SamplingParams(), cache)


def collect(chunks: Iterator[GenerationChunk]) -> GenerationResult:
    """Run a stream to its end and return the result its last chunk carries."""
    result = None
    for chunk in chunks:
        result = chunk.result or result
    assert result is not None, "a generation stream ended without its final chunk"
    return result


def generate(pipe: Pipeline, prompt: str, images: Sequence[ImageInput] = (), *, system: str | None = None,
             sampling: SamplingParams | None = None, cache: PromptCache | None = None,
             raw: bool = False) -> GenerationResult:
    """`stream_generate`, collected."""
    return collect(stream_generate(pipe, prompt, images, system=system, sampling=sampling, cache=cache, raw=raw))
