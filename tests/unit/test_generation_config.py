"""What the converter records from a checkpoint's generation_config.json (the manifest's `generation`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convert.generation_config import read_generation_config

pytestmark = pytest.mark.unit

# google/gemma-3-4b-it's generation_config.json, as published (MedGemma's has the same shape)
GEMMA3 = {"bos_token_id": 2, "cache_implementation": "hybrid", "do_sample": True, "eos_token_id": [1, 106],
          "pad_token_id": 0, "top_k": 64, "top_p": 0.95, "transformers_version": "4.50.0.dev0"}


def _read(tmp_path: Path, content: object) -> dict | None:
    (tmp_path / "generation_config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return read_generation_config(tmp_path)


def test_records_the_sampling_values_and_stop_ids(tmp_path: Path) -> None:
    assert _read(tmp_path, GEMMA3) == {"do_sample": True, "top_k": 64, "top_p": 0.95, "eos_token_id": [1, 106]}
    assert _read(tmp_path, {"do_sample": False, "temperature": 0.7, "eos_token_id": 1}) == {
        "do_sample": False, "temperature": 0.7, "eos_token_id": [1]}


def test_missing_or_broken_files_record_nothing_and_bad_values_are_dropped(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    assert read_generation_config(tmp_path) is None
    assert _read(tmp_path, "{not json") is None
    assert _read(tmp_path, [1, 2]) is None
    got = _read(tmp_path, {"do_sample": "yes", "temperature": "hot", "top_k": 6.5, "top_p": 0.9})
    assert got == {"do_sample": False, "top_p": 0.9}
    assert "temperature 'hot' is not a number" in caplog.text
