"""Sampling from one logits row: greedy, temperature, top-k, top-p, seeds, and the parameter checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medgemma_edge import SamplingParams, UserError
from medgemma_edge.runtime.sampling import sample

pytestmark = pytest.mark.unit

LOGITS = np.array([1.0, 3.0, 2.0, -1.0, 0.5], dtype=np.float32)


def _draws(n: int, seed: int = 0, **kw: float) -> list[int]:
    rng = np.random.default_rng(seed)
    return [sample(LOGITS, rng, **kw) for _ in range(n)]


def test_temperature_zero_is_argmax() -> None:
    assert set(_draws(50, temperature=0.0)) == {1}


def test_top_k_keeps_only_the_k_best() -> None:
    assert set(_draws(400, temperature=5.0, top_k=2)) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    p = np.exp(LOGITS - LOGITS.max())
    p /= p.sum()  # [0.09, 0.66, 0.24, 0.01, 0.05]: 0.66 + 0.24 reaches 0.8
    assert p[1] < 0.8 < p[1] + p[2]
    assert set(_draws(400, temperature=1.0, top_p=0.8)) == {1, 2}


def test_temperature_one_follows_the_softmax() -> None:
    draws = np.bincount(_draws(20000, temperature=1.0), minlength=5) / 20000
    p = np.exp(LOGITS - LOGITS.max())
    assert np.allclose(draws, p / p.sum(), atol=0.015)


def test_same_seed_same_draws_other_seed_other_draws() -> None:
    assert _draws(40, seed=7, temperature=2.0) == _draws(40, seed=7, temperature=2.0)
    assert _draws(40, seed=7, temperature=2.0) != _draws(40, seed=8, temperature=2.0)


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.1),
    ("top_p", math.nan), ("top_p", 1.5), ("top_k", -1), ("seed", -5), ("max_new_tokens", 0),
    ("max_new_tokens", 10**9), ("temperature", True),
])
def test_out_of_range_parameters_are_refused_by_name(field: str, value: float) -> None:
    with pytest.raises(UserError, match=field):
        SamplingParams(**{field: value})


def test_defaults_are_greedy() -> None:
    s = SamplingParams()
    assert s.temperature == 0.0 and s.top_k == 0 and s.top_p == 1.0 and s.seed is None
