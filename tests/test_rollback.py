"""A prompt cache rolled back to a shared prefix answers exactly as a fresh context would, including past
what the sliding-window layers still hold (their cache keeps only the window: rollback replays)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import medgemma_edge

WINDOW = 32  # the tiny model's sliding window; llama.cpp keeps window + 512 cells on those layers


@pytest.mark.parametrize("decoder", ["gguf:f32", "onnx:fp32"])
def test_rollback_past_the_window_matches_a_fresh_prefill(tiny_bundle: Path, decoder: str) -> None:
    with medgemma_edge.load(tiny_bundle, decoder=decoder, text_only=True, n_ctx=2048, verify=False) as pipe:
        long = [2] + [1000 + (i % 300) for i in range(1500)]  # far past window + batch
        branch = long[:200] + [4000 + i for i in range(40)]  # shares 200 positions, then differs
        cache = pipe.new_cache()
        cache.sync(long)
        logits, reused = cache.sync(branch)
        assert reused == 200
        # a fresh context fed the same calls (200, then 40): llama.cpp's kernels differ with the batch size,
        # so only the same split can be compared exactly
        fresh = pipe.new_cache()
        fresh.sync(branch[:200])
        expected, _ = fresh.sync(branch)
        single, _ = pipe.new_cache().sync(branch)
    np.testing.assert_allclose(logits[-1], expected[-1], atol=1e-5, rtol=0)
    assert int(np.argmax(logits[-1])) == int(np.argmax(single[-1]))


def test_rollback_within_the_window_reuses_without_replay(tiny_bundle: Path, caplog) -> None:
    with medgemma_edge.load(tiny_bundle, decoder="gguf:f32", text_only=True, n_ctx=2048, verify=False) as pipe:
        cache = pipe.new_cache()
        prompt = [2] + [1000 + i for i in range(100)]
        cache.sync(prompt)
        with caplog.at_level("INFO"):
            _, reused = cache.sync(prompt[:90] + [5000, 5001])
    assert reused == 90 and "replaying" not in caplog.text
