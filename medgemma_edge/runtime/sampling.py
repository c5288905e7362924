"""Sampling parameters as one value, and token sampling from one logits row (pure numpy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medgemma_edge.errors import UserError

MAX_NEW_TOKENS = 8192  # MedGemma's documented output limit
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. The default is greedy, so answers are reproducible."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks time a fixed amount of work)

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        _check_float("temperature", self.temperature, 0.0, 100.0)
        _check_float("top_p", self.top_p, 0.0, 1.0)
        _check_int("top_k", self.top_k, 0, 1 << 31)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)


def _check_float(name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        raise UserError(f"{name} {value!r} is out of range: give a finite number from {lo:g} to {hi:g}")


def _check_int(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{name} {value!r} is out of range: give a whole number from {lo} to {hi}")


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0) -> int:
    """logits: [vocab]. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""
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
    return int(rng.choice(probs.size, p=probs))
