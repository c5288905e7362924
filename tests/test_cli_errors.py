"""The CLI's error contract, through the real console script in a subprocess.

Project rule: bad input gets ONE line on stderr, `error: <file>: <problem>; <fix>`, and a non-zero exit;
no Python traceback ever reaches the user, and a refused command leaves nothing half-written behind.
A subprocess is the only honest test of that: it sees exactly what a hospital engineer's terminal sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_no_partials, assert_one_line_error, linked_copy, run_cli

from medgemma_edge import open_bundle

TIMINGS = ("load_s", "image_encode_ms", "prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s")


def _artifact_path(bundle: Path, kind: str, artifact_id: str) -> Path:
    """Where the manifest (the source of truth, never a file-name guess) puts an artifact."""
    b = open_bundle(bundle)
    return b.path(b.find(kind, artifact_id))


# -- run: images ------------------------------------------------------------------------------------
def test_run_missing_image(tiny_bundle: Path, tmp_path: Path) -> None:
    image = tmp_path / "no-such-cxr.png"
    assert_one_line_error(run_cli("run", "--bundle", tiny_bundle, "--image", image, "Describe"), image)


def test_run_image_that_is_not_an_image(tiny_bundle: Path, tmp_path: Path) -> None:
    image = tmp_path / "report.png"
    image.write_text("Findings: no acute cardiopulmonary process.\n")
    assert_one_line_error(run_cli("run", "--bundle", tiny_bundle, "--image", image, "Describe"), image)


# -- run --decoder-gguf: broken files --------------------------------------------------------------
def _truncated_gguf(tiny_bundle: Path, tmp_path: Path) -> Path:
    src = _artifact_path(tiny_bundle, "decoder", "gguf:q8_0")
    out = tmp_path / "half.gguf"
    with src.open("rb") as f:
        out.write_bytes(f.read(src.stat().st_size // 2))
    return out


def _not_a_gguf(tiny_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "notes.gguf"
    out.write_text("this is a text file, not a model\n")
    return out


@pytest.mark.parametrize("make", [_truncated_gguf, _not_a_gguf], ids=["truncated", "not-gguf"])
def test_run_broken_decoder_gguf(make, tiny_bundle: Path, tmp_path: Path) -> None:
    gguf = make(tiny_bundle, tmp_path)
    assert_one_line_error(run_cli("run", "--decoder-gguf", gguf, "Hello"), gguf)


# -- run --bundle: integrity and manifests ---------------------------------------------------------
def test_tampered_artifact_is_refused_by_run_and_info(tiny_bundle: Path, tmp_path: Path) -> None:
    # Never tamper with the shared session bundle: the victim is a real copy, the rest hard links.
    bundle = linked_copy(tiny_bundle, tmp_path / "bundle", private=(_artifact_path(tiny_bundle, "decoder", "gguf:q8_0").name,))
    victim = _artifact_path(bundle, "decoder", "gguf:q8_0")
    with victim.open("r+b") as f:  # same size, one byte different: only the sha256 can tell
        f.seek(victim.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))

    ran = run_cli("run", "--bundle", bundle, "--decoder", "gguf:q8_0", "--max-new-tokens", "2", "Hello")
    line = assert_one_line_error(ran, victim, "sha256")
    checked = run_cli("info", bundle)
    assert assert_one_line_error(checked, victim, "sha256") == line
    assert checked.returncode == ran.returncode


def test_no_verify_runs_an_intact_bundle(tiny_bundle: Path) -> None:
    res = run_cli("run", "--bundle", tiny_bundle, "--decoder", "gguf:q8_0", "--no-verify",
                  "--max-new-tokens", "2", "--json", "Hello")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert json.loads(res.stdout)["decoder"] == "gguf:q8_0"
    assert "integrity check skipped (--no-verify)" in res.stderr  # the user's choice is never silent


def test_run_folder_without_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-bundle"
    folder.mkdir()
    assert_one_line_error(run_cli("run", "--bundle", folder, "Hello"), folder, "manifest.json")


def test_run_manifest_not_json(tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "manifest.json").write_text("{this is not json")
    assert_one_line_error(run_cli("run", "--bundle", folder, "Hello"), folder / "manifest.json")


def test_run_hub_id_never_downloads(tmp_path: Path) -> None:
    hub_id = "google/medgemma-4b-it"
    line = assert_one_line_error(run_cli("run", "--bundle", hub_id, "Hello", cwd=tmp_path), hub_id)
    assert "never downloads" in line and "medgemma-edge convert" in line, line


def test_run_artifact_the_bundle_lacks(tiny_bundle: Path) -> None:
    line = assert_one_line_error(run_cli("run", "--bundle", tiny_bundle, "--decoder", "gguf:q2_k", "Hello"),
                                 tiny_bundle, "gguf:q2_k")
    assert "gguf:q8_0" in line, f"the message should list what the bundle has: {line}"


# -- convert and synth: refused before anything is written ------------------------------------------
def test_convert_folder_without_config(tmp_path: Path) -> None:
    src, out = tmp_path / "ckpt", tmp_path / "bundle"
    src.mkdir()
    assert_one_line_error(run_cli("convert", src, "-o", out), src / "config.json")
    assert not out.exists()
    assert_no_partials(out)


def test_convert_onto_non_empty_output(tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    line = assert_one_line_error(run_cli("convert", tiny_ckpt, "-o", out), out)
    assert "--overwrite" in line, line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert_no_partials(out)


def test_convert_refuses_query_scale_llama_cpp_ignores(tiny_ckpt: Path, tmp_path: Path) -> None:
    src, out = tmp_path / "ckpt", tmp_path / "bundle"
    linked_copy(tiny_ckpt, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["query_pre_attn_scalar"] = 2 * cfg["text_config"].get("head_dim", 256)
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    line = assert_one_line_error(run_cli("convert", src, "-o", out), src / "config.json")
    assert "query_pre_attn_scalar" in line, line
    assert not out.exists()
    assert_no_partials(out)


def test_synth_into_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_one_line_error(run_cli("synth", out), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert_no_partials(out)


# -- usage errors, outputs that are files, manifests with a broken config -----------------------------
def test_usage_error_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("run", "--bundle", tmp_path, "--max-new-tokens", "0", "Hello"), "--max-new-tokens")


@pytest.mark.parametrize("command", ["convert", "synth"])
def test_output_that_is_a_file(command: str, tiny_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file, not a folder")
    args = ["convert", tiny_ckpt, "-o", out] if command == "convert" else ["synth", out]
    assert_one_line_error(run_cli(*args), out)


def test_manifest_config_missing_keys(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    folder.mkdir()
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "config": {}}))
    assert_one_line_error(run_cli("run", "--bundle", folder, "--no-verify", "Hello"), folder / "manifest.json")


# -- the happy path the errors are measured against --------------------------------------------------
def test_run_json_happy_path(tiny_bundle: Path, xray_png: Path) -> None:
    res = run_cli("run", "--bundle", tiny_bundle, "--image", xray_png, "--decoder", "gguf:q8_0",
                  "--max-new-tokens", "4", "--json", "Describe")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert {"text", "tokens", "timings", "notice"} <= out.keys(), out.keys()
    assert isinstance(out["text"], str) and out["notice"]
    assert out["tokens"]["image"] > 0 and 0 <= out["tokens"]["generated"] <= 4, out["tokens"]
    for key in TIMINGS:
        assert isinstance(out["timings"][key], (int, float)) and out["timings"][key] >= 0, (key, out["timings"])


def test_overwrite_never_replaces_a_folder_that_is_not_a_bundle(tiny_ckpt: Path, tmp_path: Path) -> None:
    documents = tmp_path / "Documents"
    documents.mkdir()
    (documents / "report.txt").write_text("precious")
    assert_one_line_error(run_cli("convert", tiny_ckpt, "-o", documents, "--gguf", "q8_0", "--mmproj", "", "--overwrite"),
                          documents)
    assert (documents / "report.txt").read_text() == "precious"
