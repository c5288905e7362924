"""Structured answers (JSON schema, llguidance): every finished answer parses and validates (jsonschema) on the
real Gemma 3 270M and on the tiny synthetic bundle with both decoder backends; an answer cut off by
max_new_tokens is reported as such, never as valid; bad schema files get one line; and the manifest's
recorded generation config drives `--sampling model`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jsonschema
import pytest
from helpers import assert_one_line_error, linked_copy, run_cli

import medgemma_edge
from medgemma_edge import SamplingParams, UserError

REPORT = {"type": "object", "additionalProperties": False, "required": ["findings", "impression"],
          "properties": {"findings": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 40}},
                         "impression": {"type": "string", "maxLength": 60}}}
# bounded everywhere, so even random weights finish well within the token budget
TRIAGE = {"type": "object", "additionalProperties": False, "required": ["finding", "severity", "sides", "note", "urgent"],
          "properties": {"finding": {"enum": ["normal", "effusion", "pneumothorax", "mass"]},
                         "severity": {"type": "integer", "minimum": 0, "maximum": 10},
                         "sides": {"type": "array", "maxItems": 2, "items": {"enum": ["left", "right"]}},
                         "note": {"type": "string", "maxLength": 6},
                         "urgent": {"type": "boolean"}}}
OPEN_ENDED = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
CXR = "Chest X-ray: small left pleural effusion, no pneumothorax. Report it as JSON."


def _valid(result, schema: dict) -> object:
    assert result.schema_valid is True and result.stop_reason == "eos", (result.stop_reason, result.text)
    doc = json.loads(result.text)
    jsonschema.validate(doc, schema)
    return doc


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_270m_answers_validate(pipe_270m, seed: int | None) -> None:
    sampling = SamplingParams(max_new_tokens=160, json_schema=REPORT, seed=seed, temperature=0.0 if seed is None else 0.8)
    result = medgemma_edge.generate(pipe_270m, CXR, sampling=sampling)
    _valid(result, REPORT)
    assert result.timings["schema_mask_ms_mean"] > 0 and result.timings["schema_mask_ms_p95"] > 0


def test_an_answer_cut_off_is_never_reported_valid(pipe_270m, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        result = medgemma_edge.generate(pipe_270m, "Tell a long story.",
                                        sampling=SamplingParams(max_new_tokens=8, json_schema=OPEN_ENDED))
    assert result.stop_reason == "length" and result.schema_valid is False and len(result.token_ids) == 8
    assert result.text.startswith('{"story":"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)
    assert "not a complete JSON document" in caplog.text and "stop_reason length" in caplog.text


def test_without_a_schema_nothing_is_claimed(pipe_270m) -> None:
    result = medgemma_edge.generate(pipe_270m, CXR, sampling=SamplingParams(max_new_tokens=2))
    assert result.schema_valid is None and "schema_mask_ms_mean" not in result.timings


@pytest.fixture(scope="module")
def tiny_pipes(tiny_bundle: Path):
    pipes = {d: medgemma_edge.load(tiny_bundle, decoder=d, text_only=True, verify=False) for d in ("gguf:q8_0", "onnx:int8")}
    yield pipes
    for p in pipes.values():
        p.close()


@pytest.mark.parametrize("decoder", ["gguf:q8_0", "onnx:int8"])
def test_tiny_random_weights_answer_valid_json_on_both_backends(tiny_pipes, decoder: str) -> None:
    pipe = tiny_pipes[decoder]
    docs = []
    for seed in (None, 0, 1, 2):
        sampling = SamplingParams(max_new_tokens=96, json_schema=TRIAGE, seed=seed, temperature=0.0 if seed is None else 1.0)
        docs.append(_valid(medgemma_edge.generate(pipe, "Triage this film.", sampling=sampling), TRIAGE))
    assert len({json.dumps(d) for d in docs}) > 1  # sampling really varied the documents


@pytest.mark.parametrize("decoder", ["gguf:q8_0", "onnx:int8"])
def test_tiny_cut_off_reports_length(tiny_pipes, decoder: str) -> None:
    result = medgemma_edge.generate(tiny_pipes[decoder], "Go on.",
                                    sampling=SamplingParams(max_new_tokens=5, json_schema=OPEN_ENDED))
    assert result.stop_reason == "length" and result.schema_valid is False


def test_cli_json_schema(tiny_bundle: Path, tmp_path: Path) -> None:
    schema = tmp_path / "triage.json"
    schema.write_text(json.dumps(TRIAGE))
    base = ["run", "--bundle", tiny_bundle, "--decoder", "gguf:q8_0", "--no-verify"]
    streamed = run_cli(*base, "--json-schema", schema, "--max-new-tokens", "96", "Triage this film.")
    assert streamed.returncode == 0, streamed.stderr
    jsonschema.validate(json.loads(streamed.stdout), TRIAGE)
    out = json.loads(run_cli(*base, "--json-schema", schema, "--max-new-tokens", "96", "--json", "Triage this film.").stdout)
    assert out["schema_valid"] is True and json.loads(out["text"]) == json.loads(streamed.stdout)
    assert out["sampling"]["json_schema"] == TRIAGE
    open_ended = tmp_path / "story.json"
    open_ended.write_text(json.dumps(OPEN_ENDED))
    cut = run_cli(*base, "--json-schema", open_ended, "--max-new-tokens", "4", "--json", "Go on.")
    assert cut.returncode == 0 and json.loads(cut.stdout)["schema_valid"] is False
    assert json.loads(cut.stdout)["stop_reason"] == "length" and "not a complete JSON document" in cut.stderr


@pytest.mark.parametrize("content,problem", [
    ('{"type": "strin"}', "Invalid type: strin"),
    ('{"type": "object",', "not JSON"),
    ('{"type": "integer", "minimum": 5, "maximum": 1}', "Unsatisfiable schema"),
    ('{"not": {"type": "string"}}', "Unimplemented keys"),
    ('[1, 2]', "must be a JSON object"),
    (b"\xff\xfe{}", "cannot read"),
])
def test_bad_schema_files_get_one_line_naming_the_file(tiny_bundle: Path, tmp_path: Path, content: str | bytes,
                                                       problem: str) -> None:
    path = tmp_path / "schema.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = assert_one_line_error(run_cli("run", "--bundle", tiny_bundle, "--json-schema", path, "Hi"), path)
    assert problem in line, line


def test_a_missing_schema_file_is_named(tiny_bundle: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    line = assert_one_line_error(run_cli("run", "--bundle", tiny_bundle, "--json-schema", missing, "Hi"), missing)
    assert "not found" in line


def test_schema_from_python_is_checked_before_any_work() -> None:
    with pytest.raises(UserError, match="json_schema: Invalid type"):
        SamplingParams(json_schema={"type": "strin"})


def test_manifest_records_generation_config_and_sampling_model_uses_it(tiny_bundle: Path, tmp_path: Path) -> None:
    from medgemma_edge.bundle import open_bundle

    # synth writes do_sample false, as Google's fine-tune notebook sets it: recorded, and greedy
    assert open_bundle(tiny_bundle).manifest["generation"] == {"do_sample": False, "eos_token_id": [1, 106]}
    base = ["--decoder", "gguf:q8_0", "--no-verify", "--max-new-tokens", "2", "--json", "--sampling", "model", "Hi"]
    greedy = json.loads(run_cli("run", "--bundle", tiny_bundle, *base).stdout)["sampling"]
    assert greedy["temperature"] == 0.0
    copy = linked_copy(tiny_bundle, tmp_path / "b")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["generation"] = {"do_sample": True, "top_k": 64, "top_p": 0.95, "eos_token_id": [1, 106]}  # Gemma 3's
    (copy / "manifest.json").write_text(json.dumps(manifest))
    sampled = json.loads(run_cli("run", "--bundle", copy, *base).stdout)["sampling"]
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"]) == (1.0, 64, 0.95)
    mine = json.loads(run_cli("run", "--bundle", copy, "--temperature", "0.5", *base).stdout)["sampling"]
    assert (mine["temperature"], mine["top_k"]) == (0.5, 64)  # what the command line says wins
    manifest["generation"] = None
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert "records no generation config" in assert_one_line_error(run_cli("run", "--bundle", copy, *base), copy)
    default = json.loads(run_cli("run", "--bundle", copy, *base[:-3], "Hi").stdout)["sampling"]
    assert default["temperature"] == 0.0  # without --sampling model: greedy, whatever the manifest says
