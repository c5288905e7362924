"""Sampling parameters as one value, and token sampling from one logits row (pure numpy).

Each step treats the logits row in this order (runtime/generate.py): logit bias, then the repetition,
presence and frequency penalties (runtime/penalties.py), then the JSON-schema mask
(runtime/constraints.py); then `sample`: temperature, top-k, top-p, min-p, and the draw. Temperature 0
(the default) takes the argmax of the treated row, so answers are reproducible.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from medgemma_edge.errors import UserError

MAX_NEW_TOKENS = 8192  # MedGemma's documented output limit
MAX_SEED = 2**63 - 1
MAX_TOKEN_ID = 1 << 31
MAX_STOPS, MAX_STOP_CHARS = 16, 256  # stop sequences: how many, and how long each may be
MAX_BIASES = 1024  # logit-bias entries
BAN = -100.0  # a bias at (or below) this bans the token outright, as OpenAI documents for -100
MAX_SCHEMA_BYTES = 1 << 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. The default is greedy, so answers are reproducible.

    - `stop`: strings that end the answer; the answer ends just before the first one found (which is not
      part of the text), `stop_reason` "stop". They are matched on the answer, not on the reasoning.
    - `repetition_penalty` (1 = off): every token of the prompt or the answer so far has its logit divided
      by it when positive, multiplied when negative (ref: CTRL, as transformers and vLLM apply it).
    - `presence_penalty`, `frequency_penalty` (0 = off, OpenAI's meaning): subtracted once per token
      already in the answer, and once per occurrence; they count the answer only, not the prompt.
    - `min_p` (0 = off): drop tokens whose probability (after temperature) is below min_p x the top one's.
    - `logit_bias`: token id -> bias added to its logit (a dict or (id, bias) pairs); -100 bans a token.
    - `json_schema`: a JSON schema (dict or JSON text); the answer is constrained to a document that
      validates against it (compact JSON, no free whitespace). See runtime/constraints.py.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks time a fixed amount of work)
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    json_schema: str | None = None  # stored as JSON text (property order kept: it is the order generated)

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        _check_float("temperature", self.temperature, 0.0, 100.0)
        _check_float("top_p", self.top_p, 0.0, 1.0)
        _check_int("top_k", self.top_k, 0, 1 << 31)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        _check_float("repetition_penalty", self.repetition_penalty, 0.01, 10.0)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        object.__setattr__(self, "stop", _stops(self.stop))
        object.__setattr__(self, "logit_bias", _biases(self.logit_bias))
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", _schema_text(self.json_schema))
            if self.ignore_eos:
                raise UserError("json_schema and ignore_eos exclude each other: a constrained answer ends where "
                                "its document ends; drop one")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def bias(self) -> dict[int, float]:
        return dict(self.logit_bias)

    def to_json(self) -> dict[str, Any]:
        """The parameters as plain JSON values (what `run --json` reports as `sampling`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["stop"] = list(self.stop)
        out["logit_bias"] = {str(k): v for k, v in self.logit_bias}
        out["json_schema"] = None if self.json_schema is None else json.loads(self.json_schema)
        return out


def _check_float(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        raise UserError(f"{name} {value!r} is out of range: give a finite number from {lo:g} to {hi:g}")


def _check_int(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{name} {value!r} is out of range: give a whole number from {lo} to {hi}")


def _stops(value: Any) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if len(items) > MAX_STOPS:
        raise UserError(f"stop: {len(items)} stop sequences, at most {MAX_STOPS}; give fewer")
    for s in items:
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
            raise UserError(f"stop: {s!r} is not a stop sequence; give text of 1 to {MAX_STOP_CHARS} characters")
    return items


def _biases(value: Any) -> tuple[tuple[int, float], ...]:
    pairs = list(value.items()) if isinstance(value, Mapping) else list(value)
    if len(pairs) > MAX_BIASES:
        raise UserError(f"logit_bias: {len(pairs)} entries, at most {MAX_BIASES}; give fewer")
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise UserError(f"logit_bias: {pair!r} is not a (token id, bias) pair")
        token, bias = pair
        if isinstance(token, str) and token.strip().isdigit():  # JSON object keys arrive as text
            token = int(token)
        _check_int("logit_bias token id", token, 0, MAX_TOKEN_ID)
        _check_float(f"logit_bias[{token}]", bias, -100.0, 100.0)
        out[int(token)] = float(bias)
    return tuple(sorted(out.items()))


def _schema_text(schema: Any) -> str:
    """The schema as JSON text, checked now (one line naming the problem) rather than mid-answer."""
    from medgemma_edge.runtime.constraints import check_schema

    if isinstance(schema, str):
        if len(schema.encode("utf-8", "replace")) > MAX_SCHEMA_BYTES:
            raise UserError(f"json_schema: {len(schema)} characters, more than {MAX_SCHEMA_BYTES} bytes allowed")
        try:
            parsed = json.loads(schema)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise UserError(f"json_schema: not JSON ({exc}); give a JSON schema object") from None
    else:
        parsed = schema
    try:
        text = json.dumps(parsed)
    except (TypeError, ValueError, RecursionError) as exc:
        raise UserError(f"json_schema: not a JSON value ({exc}); give a JSON schema object") from None
    check_schema(parsed)
    return text


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> int:
    """logits: [vocab]. temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 disable those filters.

    The filters apply to the temperature-scaled distribution, in the order top-k, top-p, min-p
    (ref: transformers' logits warpers; vLLM's min_p is relative to the top probability in the same way)."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    if 0 < top_k < x.size:
        kth = np.partition(x, -top_k)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]  # smallest set whose mass reaches top_p
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    if min_p > 0.0:
        probs = np.where(probs >= min_p * probs.max(), probs, 0.0)  # the top token always survives
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


# -- the checkpoint's recommended sampling (its generation_config.json, recorded in the manifest) ---------------
RECOMMENDED_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def recommended(generation: Mapping[str, Any] | None, where: str, **overrides: Any) -> SamplingParams:
    """SamplingParams from a checkpoint's generation config as the manifest records it (`generation`).

    transformers' meaning: `do_sample` false is greedy whatever else is set; true samples with the values
    given and transformers' defaults for the rest (temperature 1, top_k 50, top_p 1). `overrides` win.
    """
    if not isinstance(generation, Mapping):
        raise UserError(f"{where}: records no generation config (converted from a checkpoint without "
                        f"generation_config.json, or by an older medgemma-edge); convert again or drop --sampling model")
    values: dict[str, Any] = {}
    if generation.get("do_sample"):
        values = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
        values.update({k: generation[k] for k in RECOMMENDED_KEYS if generation.get(k) is not None})
    elif generation.get("repetition_penalty") is not None:  # a logits processor: greedy applies it too
        values["repetition_penalty"] = generation["repetition_penalty"]
    try:
        return SamplingParams(**{**values, **overrides})
    except UserError as exc:
        raise UserError(f"{where}: recorded generation config: {exc}") from None
