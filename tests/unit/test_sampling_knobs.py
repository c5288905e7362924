"""The sampler's knobs as pure functions: min-p, penalties, logit bias, their checks, the recommended
sampling from a recorded generation config, and the schema check (llguidance, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medgemma_edge import SamplingParams, UserError
from medgemma_edge.runtime.penalties import LogitBias, Penalties
from medgemma_edge.runtime.sampling import recommended, sample

pytestmark = pytest.mark.unit

LOGITS = np.array([1.0, 3.0, 2.0, -1.0, 0.5], dtype=np.float32)


def test_min_p_keeps_tokens_within_a_factor_of_the_top_one() -> None:
    p = np.exp(LOGITS - LOGITS.max())  # relative to the top: [0.14, 1, 0.37, 0.02, 0.08]
    assert p[2] > 0.3 > p[0]
    rng = np.random.default_rng(0)
    draws = {sample(LOGITS, rng, temperature=1.0, min_p=0.3) for _ in range(500)}
    assert draws == {1, 2}
    assert {sample(LOGITS, rng, temperature=1.0, min_p=1.0) for _ in range(100)} == {1}  # only the top survives


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    pen = Penalties(SamplingParams(repetition_penalty=2.0), prompt_ids=[1, 3], n_logits=5)
    row = LOGITS.copy()
    pen.apply(row)
    assert row.tolist() == [1.0, 1.5, 2.0, -2.0, 0.5]  # prompt tokens 1 (3 -> 1.5) and 3 (-1 -> -2)
    pen.accept(4)
    row = LOGITS.copy()
    pen.apply(row)
    assert row[4] == 0.25 and row[0] == 1.0


def test_presence_and_frequency_count_the_answer_only() -> None:
    pen = Penalties(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt_ids=[0, 1], n_logits=5)
    for tok in (2, 2, 2, 4):
        pen.accept(tok)
    row = LOGITS.copy()
    pen.apply(row)
    assert np.allclose(row, [1.0, 3.0, 2.0 - 0.5 - 0.75, -1.0, 0.5 - 0.5 - 0.25])


def test_logit_bias_adds_and_bans() -> None:
    bias = LogitBias(SamplingParams(logit_bias={3: 10.0, 1: -100.0}).logit_bias, 5)
    row = LOGITS.copy()
    bias.apply(row)
    assert row[3] == 9.0 and row[1] == -np.inf and int(np.argmax(row)) == 3
    with pytest.raises(UserError, match="token id 7 is outside"):
        LogitBias(((7, 1.0),), 5)


def test_params_accept_json_shapes_and_stay_hashable() -> None:
    s = SamplingParams(stop=["\n\n", "Q:"], logit_bias={"106": -100, 5: 2})  # JSON object keys come as text
    assert s.stop == ("\n\n", "Q:") and s.logit_bias == ((5, 2.0), (106, -100.0))
    assert SamplingParams(stop="END").stop == ("END",)
    hash(s)
    assert s.to_json()["logit_bias"] == {"5": 2.0, "106": -100.0}


@pytest.mark.parametrize("kw,field", [
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": math.nan}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -math.inf}, "frequency_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"min_p": math.nan}, "min_p"),
    ({"stop": [""]}, "stop"), ({"stop": ["x" * 300]}, "stop"), ({"stop": ["a"] * 17}, "stop"), ({"stop": [3]}, "stop"),
    ({"logit_bias": {5: 101}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": {5: math.nan}}, "logit_bias"), ({"logit_bias": [(1, 2, 3)]}, "logit_bias"),
    ({"json_schema": "{not json"}, "json_schema"), ({"json_schema": {"type": "strin"}}, "json_schema"),
    ({"json_schema": True}, "json_schema"), ({"json_schema": {"not": {"type": "string"}}}, "json_schema"),
    ({"json_schema": {"type": "integer", "minimum": 3, "maximum": 1}}, "json_schema"),
    ({"json_schema": {"$ref": "#/defs/none"}}, "json_schema"),
    ({"json_schema": {"type": "object"}, "ignore_eos": True}, "json_schema"),
])
def test_bad_values_are_refused_in_one_line_naming_the_field(kw: dict, field: str) -> None:
    with pytest.raises(UserError, match=field) as err:
        SamplingParams(**kw)
    assert "\n" not in str(err.value)


def test_defaults_stay_greedy_and_off() -> None:
    s = SamplingParams()
    assert s.greedy and s.stop == () and s.logit_bias == () and s.json_schema is None
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty, s.min_p) == (1.0, 0.0, 0.0, 0.0)


def test_schema_keeps_its_property_order() -> None:
    schema = '{"type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "integer"}}}'
    assert SamplingParams(json_schema=schema).json_schema.index("zeta") < SamplingParams(json_schema=schema).json_schema.index("alpha")


def test_recommended_follows_transformers_meaning() -> None:
    gemma = {"do_sample": True, "top_k": 64, "top_p": 0.95, "eos_token_id": [1, 106]}
    s = recommended(gemma, "b")
    assert (s.temperature, s.top_k, s.top_p) == (1.0, 64, 0.95)  # temperature: transformers' default
    assert recommended({"do_sample": False, "temperature": 0.7, "top_k": 5}, "b").greedy  # do_sample false: greedy
    s = recommended(gemma, "b", temperature=0.3, max_new_tokens=9)
    assert (s.temperature, s.top_k, s.max_new_tokens) == (0.3, 64, 9)
    with pytest.raises(UserError, match="records no generation config"):
        recommended(None, "bundleX")
    with pytest.raises(UserError, match="bundleX: recorded generation config: temperature"):
        recommended({"do_sample": True, "temperature": 1e9}, "bundleX")
