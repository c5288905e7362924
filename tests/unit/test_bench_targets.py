"""`bench`'s Targets table: every composed path measured gets its own row, unmeasured ones say so."""

from __future__ import annotations

from typing import Any

import pytest

from medgemma_edge.measure.report import LLAMA, TARGETS, add_comparisons, markdown
from medgemma_edge.measure.study_bench import targets as study_targets

pytestmark = pytest.mark.unit


def _row(combo: str, n: int = 1, **means: float) -> dict[str, Any]:
    stats = {k: {"mean": v, "sd": 0.0, "n": 2} for k, v in means.items()}
    return {"combo": combo, "n_images": n, "runs": [], "stats": stats}


def _doc(rows: list[dict[str, Any]]) -> dict[str, Any]:
    config = {"vision": {"image_size": 896}, "text": {"num_layers": 34, "hidden_size": 2560}, "tokens_per_image": 256}
    return {"rows": rows, "config": config, "errors": []}


LLAMA_ROW = _row(LLAMA, ttft_ms=40_000, image_encode_ms=35_000, decode_tokens_per_s=6.0, followup_ttft_ms=900,
                 peak_rss_mb=5000)


def _by(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(t["target"], t["combination"]): t for t in doc["targets"]}


def test_each_measured_encoder_path_is_held_to_the_targets() -> None:
    doc = _doc([LLAMA_ROW,
                _row("ov:int8+gguf:q4_k_m", ttft_ms=12_000, image_encode_ms=5_600, decode_tokens_per_s=6.4,
                     followup_ttft_ms=800, peak_rss_mb=3.79 * 1024),
                _row("ov:bf16+gguf:q4_k_m", ttft_ms=11_400, image_encode_ms=5_000, decode_tokens_per_s=6.3,
                     followup_ttft_ms=800, peak_rss_mb=4.54 * 1024)])
    add_comparisons(doc)
    got = _by(doc)
    ttft = got[("composed TTFT vs llama.cpp's all-GGUF path", "ov:int8+gguf:q4_k_m")]
    assert ttft["value"] == pytest.approx(0.30) and ttft["passed"] is True and ttft["against"] == LLAMA
    rss = "peak RSS, Q4_K_M + the encoder (GB)"
    assert got[(rss, "ov:int8+gguf:q4_k_m")]["passed"] is True
    bf16 = got[(rss, "ov:bf16+gguf:q4_k_m")]
    assert bf16["value"] == pytest.approx(4.54) and bf16["passed"] is False
    # onnx:int8 was not in this run: no row of its own where another encoder path was measured
    assert not any(t["combination"] == "onnx:int8+gguf:q4_k_m" for t in doc["targets"])
    # the all-ONNX targets: one row each, not measured, never counted as met
    onnx = [t for t in doc["targets"] if t["combination"] == "onnx:int8+onnx:int4"]
    assert len(onnx) == 2 and all(t["value"] is None and t["passed"] is None for t in onnx)
    md = markdown({**doc, "bundle": "b", "source": "s", "hardware": {}, "settings": {
        "warmup": 1, "reps": 2, "threads": 2, "new_tokens": 32, "reference_tokens": 0, "n_ctx": 4096,
        "synthetic_images": True, "images": []}})
    assert "| vision encode vs mtmd F16 (ov:bf16+gguf:q4_k_m / llama.cpp:f16+q4_k_m) | 0.14 | <= 0.33 | yes |" in md
    assert "| peak RSS, Q4_K_M + the encoder (GB) (ov:bf16+gguf:q4_k_m) | 4.54 | <= 4.0 | **no** |" in md


def test_nothing_composed_measured_gives_one_unmet_row_per_target() -> None:
    doc = _doc([LLAMA_ROW])
    add_comparisons(doc)
    assert len(doc["targets"]) == len(TARGETS)
    assert all(t["value"] is None and t["passed"] is None for t in doc["targets"])
    text_only = {**_doc([LLAMA_ROW]), "config": {"vision": None}}
    add_comparisons(text_only)
    assert text_only["targets"] == []


def test_study_targets_follow_the_measured_encoder_paths() -> None:
    rows = [_row(c, n, ttft_ms=t, image_encode_ms=e, peak_rss_mb=4000) for c, n, t, e in (
        ("ov:int8+gguf:q4_k_m", 1, 10_000, 5_000), ("ov:int8+gguf:q4_k_m", 16, 60_000, 64_000),
        ("onnx:int8+gguf:q4_k_m", 1, 15_000, 9_000), ("onnx:int8+gguf:q4_k_m", 16, 100_000, 120_000),
        (LLAMA, 16, 300_000, 280_000))]
    got = {(t["target"].split(" ")[0], t["combination"]): t for t in study_targets({"rows": rows})}
    assert got[("16-slice", "ov:int8+gguf:q4_k_m")]["value"] == pytest.approx(0.2)
    assert got[("per-slice", "ov:int8+gguf:q4_k_m")]["value"] == pytest.approx(0.8)
    onnx = got[("per-slice", "onnx:int8+gguf:q4_k_m")]
    assert onnx["value"] == pytest.approx(120 / 16 / 9) and onnx["passed"] is True
    assert got[("16-slice", "onnx:int8+gguf:q4_k_m")]["value"] == pytest.approx(1 / 3)
