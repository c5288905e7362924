"""Layered generation, as mlx-lm does it: `generate_step` yields token ids, `stream_generate` yields
text chunks (the last one carries the result), `generate` collects them into one GenerationResult.

Between the two layers the text is split: reasoning (`<unused94>thought ... <unused95>`, runtime/thinking.py)
from the answer, and the answer cut at the first stop sequence (runtime/stops.py). Stop reasons:
- "eos": the model ended its answer (an end-of-turn token), or its JSON document is complete;
- "stop": a stop sequence was found (the text ends just before it; `stop_sequence` names it);
- "length": max_new_tokens were generated; "context": the context filled up mid-answer;
- "unclosed_thought": the model ended while still thinking (it opened a thought and never closed it),
  so there is reasoning but no answer. Cut short while thinking, the reason stays "length"/"context".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medgemma_edge.errors import PromptTooLong, UserError
from medgemma_edge.inputs.images import ImageInput
from medgemma_edge.runtime.caches import Atom, PromptCache, positions, token_ids
from medgemma_edge.runtime.constraints import JsonConstraint
from medgemma_edge.runtime.penalties import LogitBias, Penalties
from medgemma_edge.runtime.pipeline import Pipeline
from medgemma_edge.runtime.sampling import SamplingParams, sample
from medgemma_edge.runtime.stops import StopMatcher
from medgemma_edge.runtime.template import Part
from medgemma_edge.runtime.thinking import ThinkingSplitter, thinking_markers, thinking_system

log = logging.getLogger(__name__)

NOTICE = "Research use only: not for clinical diagnosis (MedGemma model card, intended use)."


@dataclass
class GenerationResult:
    text: str  # the answer: no reasoning, no thinking markers, nothing from a stop sequence on
    token_ids: list[int]  # every generated token (markers included; end-of-turn tokens not)
    prompt_tokens: int
    image_tokens: int
    stop_reason: str  # "eos" | "stop" | "length" | "context" | "unclosed_thought" (see the module docstring)
    timings: dict[str, float] = field(default_factory=dict)
    reused_tokens: int = 0  # prompt positions served from the KV cache
    reasoning: str = ""  # what the model thought before answering ("" when it did not think)
    stop_sequence: str | None = None  # the stop sequence that ended the answer (stop_reason "stop")
    schema_valid: bool | None = None  # with a json_schema: the answer is a complete, valid document; else None

    def to_json(self, info: dict[str, Any]) -> dict[str, Any]:
        return {
            "text": self.text, "reasoning": self.reasoning, "notice": NOTICE, "stop_reason": self.stop_reason,
            "stop_sequence": self.stop_sequence, "schema_valid": self.schema_valid,
            "tokens": {"prompt": self.prompt_tokens, "image": self.image_tokens, "generated": len(self.token_ids),
                       "reused": self.reused_tokens},
            "timings": self.timings, **info,
        }


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of streamed text; the last chunk of a stream carries the whole `result`.

    `text` is answer text only; `reasoning` is thinking text (shown apart, or not at all)."""

    text: str
    token: int | None  # the token that completed this text; None for the final chunk
    result: GenerationResult | None = None
    reasoning: str = ""

    @property
    def finish_reason(self) -> str | None:
        return self.result.stop_reason if self.result else None


def generate_step(cache: PromptCache, first_logits: np.ndarray, sampling: SamplingParams, eos_ids: frozenset[int],
                  *, prompt_ids: Sequence[int] = (), constraint: JsonConstraint | None = None) -> Generator[int, None, str]:
    """Token ids after a prefill whose last logits row is `first_logits`; returns the stop reason:
    "eos" (unless ignored; also when `constraint`'s document is complete), "length" (max_new_tokens), or
    "context" (no room left to evaluate the next one). `prompt_ids`: what the repetition penalty counts
    besides the answer. Each row: logit bias, penalties, the constraint's mask, then `sample`."""
    rng = np.random.default_rng(sampling.seed)
    n_logits = int(first_logits.shape[-1])
    bias = LogitBias(sampling.logit_bias, n_logits)
    penalties = Penalties(sampling, prompt_ids, n_logits)
    treat = bias.active or penalties.active or constraint is not None
    row = first_logits
    for step in range(sampling.max_new_tokens):
        if treat:
            row = np.array(row, dtype=np.float32)  # a copy: never write into the backend's logits
            bias.apply(row)
            penalties.apply(row)
            if constraint is not None:
                constraint.mask(row, sampling.greedy)
            if not np.isfinite(row.max()):
                raise UserError("no token is left to choose: the logit bias bans every token the schema allows "
                                "here; ban fewer tokens")
        tok = sample(row, rng, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
        if constraint is not None:
            constraint.accept(tok)
        if tok in eos_ids and not sampling.ignore_eos:
            return "eos"
        yield tok
        penalties.accept(tok)
        if constraint is not None and constraint.stopped:  # the document is complete: nothing may follow
            return "eos"
        if step + 1 == sampling.max_new_tokens:
            break
        if cache.decoder.n_past >= cache.n_ctx:  # the answer so far is kept; there is no room for another token
            return "context"
        row = cache.eval([tok])[-1]
    return "length"


class _Text:
    """Token pieces -> (reasoning, answer) chunks: the thinking splitter, then the stop sequences."""

    def __init__(self, pipe: Pipeline, sampling: SamplingParams) -> None:
        self.detok = pipe.tokenizer.detokenizer()
        self.splitter = ThinkingSplitter(thinking_markers(pipe.tokenizer))
        self.stops = StopMatcher(sampling.stop)
        self.reasoning: list[str] = []
        self.answer: list[str] = []

    def push(self, tok: int) -> tuple[str, str]:
        return self._keep(*self.splitter.push(tok, self.detok.push(tok)))

    def flush(self) -> tuple[str, str]:
        r1, a1 = self.splitter.push(None, self.detok.flush())
        r2, a2 = self.splitter.flush()
        reasoning, answer = self._keep(r1 + r2, a1 + a2)
        tail = self.stops.flush()
        self.answer.append(tail)
        return reasoning, answer + tail

    def _keep(self, reasoning: str, answer: str) -> tuple[str, str]:
        if self.stops.matched is not None:  # the answer has ended: a thought after it is not shown either
            return "", ""
        answer = self.stops.push(answer)
        self.reasoning.append(reasoning)
        self.answer.append(answer)
        return reasoning, answer


def stream_parts(pipe: Pipeline, parts: Sequence[Part], images: Sequence[ImageInput],
                 sampling: SamplingParams, cache: PromptCache | None = None, *,
                 thinking: bool = False) -> Iterator[GenerationChunk]:
    """Generate after already rendered parts (a chat session renders whole conversations).

    A prompt that does not fit the context is refused before anything is prefilled (PromptTooLong).
    `thinking`: the parts ask the model to think (their system text is `thinking_system`'s); a JSON schema
    then allows one thought before the document.
    """
    t0 = time.perf_counter()
    cache = pipe.cache_for(cache)
    if len(images) * pipe.facts.tokens_per_image > cache.n_ctx:  # refused before any image is encoded
        raise PromptTooLong(f"{len(images)} images need {len(images) * pipe.facts.tokens_per_image} tokens, more than "
                            f"the context of {cache.n_ctx}; raise --ctx or ask about fewer images at a time")
    spans = pipe.encode_images(images)
    t_enc = time.perf_counter()
    atoms: list[Atom] = pipe.atoms(parts, spans)
    n_prompt, n_img = positions(atoms), sum(len(s) for s in spans)
    if n_prompt > cache.n_ctx:
        images = f" ({n_img} of them for {len(spans)} image(s))" if spans else ""
        raise PromptTooLong(f"the prompt needs {n_prompt} tokens{images}, more than the context of {cache.n_ctx}; "
                            f"raise --ctx to at least {n_prompt + sampling.max_new_tokens} or shorten the prompt")
    constraint = None
    if sampling.json_schema is not None:  # before the prefill: the grammar tokenizer's first build takes seconds
        constraint = JsonConstraint(pipe.tokenizer, sampling.json_schema, pipe.decoder.n_vocab, pipe.facts.eos_ids,
                                    thinking_markers(pipe.tokenizer) if thinking else None)
    t_pre = time.perf_counter()
    tally: dict[str, float] = {}
    logits, reused = cache.sync(atoms, tally)
    t_prefill = time.perf_counter()
    if constraint is not None and logits.shape[-1] != constraint.n_logits:
        raise UserError(f"the decoder gave {logits.shape[-1]} logits, not the {constraint.n_logits} of its vocabulary; "
                        f"the bundle mixes models, convert again")
    text = _Text(pipe, sampling)
    out: list[int] = []
    t_first = None
    prompt_ids = token_ids(atoms) if sampling.repetition_penalty != 1.0 else ()
    steps = generate_step(cache, logits[-1], sampling, pipe.facts.eos_ids, prompt_ids=prompt_ids,
                          constraint=constraint)
    while True:
        try:
            tok = next(steps)
        except StopIteration as done:
            stop = done.value
            break
        if t_first is None:
            t_first = time.perf_counter()
        out.append(tok)
        reasoning, answer = text.push(tok)
        if reasoning or answer:
            yield GenerationChunk(answer, tok, reasoning=reasoning)
        if text.stops.matched is not None:
            steps.close()
            stop = "stop"
            break
    t_first = t_first or time.perf_counter()  # EOS first: the first token was still sampled
    reasoning, tail = text.flush()
    if text.stops.matched is not None:
        stop = "stop"
    t_end = time.perf_counter()
    decode_s = t_end - t_first
    timings = {
        "load_s": pipe.info.get("load_s", 0.0),
        "image_encode_ms": (t_enc - t0) * 1e3,
        "prefill_ms": (t_prefill - t_pre) * 1e3,
        "prefill_tokens_per_s": (n_prompt - reused) / max(t_prefill - t_pre, 1e-9),
        **{f"prefill_{kind}_tokens_per_s": tally.get(f"{kind}_n", 0) / max(tally.get(f"{kind}_s", 0.0), 1e-9)
           for kind in ("text", "image") if tally.get(f"{kind}_n")},
        "time_to_first_token_ms": (t_first - t0) * 1e3,
        "decode_tokens_per_s": (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0,
        **(constraint.timings() if constraint is not None else {}),
    }
    stop = _finish(stop, text.splitter, constraint, cache, len(out))
    result = GenerationResult("".join(text.answer), out, n_prompt, n_img, stop, timings, reused,
                              reasoning="".join(text.reasoning), stop_sequence=text.stops.matched,
                              schema_valid=None if constraint is None else constraint.accepting)
    yield GenerationChunk(tail, None, result, reasoning=reasoning)


def _finish(stop: str, splitter: ThinkingSplitter, constraint: JsonConstraint | None, cache: PromptCache,
            n_out: int) -> str:
    """The stop reason as reported, and the warnings that go with it."""
    if stop == "context":
        log.warning("the context of %d tokens filled up after %d generated tokens; the answer is cut short "
                    "(raise --ctx)", cache.n_ctx, n_out)
    if splitter.in_thought:
        if stop == "eos":
            stop = "unclosed_thought"
        log.warning("the model opened a thought and never closed it (stop_reason %s): there is reasoning but no "
                    "answer%s", stop, "; raise --max-new-tokens" if stop in ("length", "context") else "")
    if constraint is not None and not constraint.accepting:
        log.warning("the answer is not a complete JSON document (stop_reason %s): it does not match the schema; "
                    "raise --max-new-tokens or bound the schema (maxLength, maxItems, enum)", stop)
    return stop


def stream_generate(pipe: Pipeline, prompt: str, images: Sequence[ImageInput] = (), *, system: str | None = None,
                    sampling: SamplingParams | None = None, cache: PromptCache | None = None,
                    raw: bool = False, thinking: bool = False) -> Iterator[GenerationChunk]:
    """Answer one user turn (or continue `prompt` verbatim with raw=True), chunk by chunk.

    Without a `cache` nothing is reused from an earlier call; pass `pipe.new_cache()` to keep one.
    `thinking`: ask the model to think first (Google's system instruction before `system`); the reasoning
    comes apart from the answer (`chunk.reasoning`, `result.reasoning`). Refused for a model whose
    vocabulary has no thinking tokens.
    """
    if thinking:
        if raw:
            raise UserError("thinking needs the chat template (its instruction is system text); drop raw")
        system = thinking_system(pipe.tokenizer, system, _where(pipe))
    parts = pipe.parts(prompt, len(images), system, raw)
    yield from stream_parts(pipe, parts, list(images), sampling or SamplingParams(), cache, thinking=thinking)


def _where(pipe: Pipeline) -> str:
    return str(pipe.info.get("bundle") or pipe.info.get("decoder_gguf") or "this model")


def collect(chunks: Iterator[GenerationChunk]) -> GenerationResult:
    """Run a stream to its end and return the result its last chunk carries."""
    result = None
    for chunk in chunks:
        result = chunk.result or result
    assert result is not None, "a generation stream ended without its final chunk"
    return result


def generate(pipe: Pipeline, prompt: str, images: Sequence[ImageInput] = (), *, system: str | None = None,
             sampling: SamplingParams | None = None, cache: PromptCache | None = None,
             raw: bool = False, thinking: bool = False) -> GenerationResult:
    """`stream_generate`, collected."""
    return collect(stream_generate(pipe, prompt, images, system=system, sampling=sampling, cache=cache, raw=raw,
                                   thinking=thinking))
