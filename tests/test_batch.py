"""`medgemma-edge batch` as a user runs it (the console script, real backends, the tiny bundle): one line per item,
bad items as error lines, resume by key, SIGKILL at any point without a duplicate or a missing item."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, cli_command, run_cli
from PIL import Image
from pydicom.data import get_testdata_file

from medgemma_edge.inputs.sample_series import write_series

MODEL = ["--encoder", "onnx:fp32", "--decoder", "gguf:q8_0"]
VOLATILE = ("timings", "item_s", "host")  # differ between runs of the same item; everything else must not


def _png(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48 + seed, 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four PNGs, one DICOM, one CT study folder and one file that is not an image."""
    folder = tmp_path_factory.mktemp("cohort")
    for i in range(4):
        _png(folder / f"img{i}.png", i)
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), folder / "ct_small.dcm")
    write_series(folder / "study_a", n_slices=5, size=64)
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    return folder


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def stable(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in records}


def batch(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli("batch", *MODEL, "--no-progress", "--max-new-tokens", "6", *args)


def test_a_folder_gives_one_line_per_item_and_a_bad_item_does_not_stop_the_run(tiny_bundle: Path, cohort: Path,
                                                                                tmp_path: Path) -> None:
    out, audit = tmp_path / "results.jsonl", tmp_path / "audit.jsonl"
    res = batch("--bundle", tiny_bundle, "--input", cohort, "--prompt", "Describe this image.", "--output", out,
                "--max-slices", "3", "--audit-log", audit)
    assert res.returncode == 0, res.stderr
    records = {r["id"]: r for r in lines(out)}
    assert set(records) == {"img0.png", "img1.png", "img2.png", "img3.png", "ct_small.dcm", "study_a", "broken.png"}
    bad = records.pop("broken.png")
    assert bad["status"] == "error" and "broken.png" in bad["error"] and "\n" not in bad["error"]
    for r in records.values():
        assert r["status"] == "ok", r
        assert r["model"]["bundle_id"] and r["model"]["decoder"] == "gguf:q8_0" and r["model"]["encoder"] == "onnx:fp32"
        assert r["sampling"]["max_new_tokens"] == 6 and len(r["inputs_sha256"]) == 1
        assert r["tokens"]["generated"] <= 6 and isinstance(r["answer"], str) and "image_encode_ms" in r["timings"]
    assert records["study_a"]["study"]["slices_sampled"] == 3 and records["study_a"]["tokens"]["image"] == 3 * 16
    assert records["img0.png"]["tokens"]["image"] == 16
    assert "done 7 (failed 1), skipped 0" in res.stderr and "items/hour" in res.stderr
    assert len(lines(audit)) == 7 and all("answer" not in a for a in lines(audit))  # no text unless asked

    again = batch("--bundle", tiny_bundle, "--input", cohort, "--prompt", "Describe this image.", "--output", out,
                  "--max-slices", "3")
    assert again.returncode == 0 and "done 0 (failed 0), skipped 7" in again.stderr, again.stderr
    assert len(lines(out)) == 7


def test_resume_reruns_exactly_what_changed(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"i{i}.png", i)
    out = tmp_path / "r.jsonl"
    common = ("--bundle", tiny_bundle, "--input", folder, "--prompt", "Describe.", "--output", out)
    assert batch(*common).returncode == 0
    first = stable(lines(out))
    _png(folder / "i1.png", 7)  # new pixels under the same name: that item's inputs changed
    res = batch(*common)
    assert res.returncode == 0 and "done 1 (failed 0), skipped 2" in res.stderr, res.stderr
    assert [r["id"] for r in lines(out)] == ["i0.png", "i1.png", "i2.png", "i1.png"]
    res = batch(*common, "--temperature", "0.7", "--seed", "3")  # other parameters: every item again
    assert res.returncode == 0 and "done 3 (failed 0), skipped 0" in res.stderr, res.stderr
    assert "other items or parameters" not in res.stderr  # informational only at -v
    assert stable(lines(out)[:1]) == {"i0.png": first["i0.png"]}  # earlier lines are never rewritten


def _manifest(tmp_path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        rows.append({"id": f"case{i:02d}", "images": [str(_png(tmp_path / f"c{i}.png", i))],
                     "question": f"Describe image {i}."})
    path = tmp_path / "cohort.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _kill_after(args: list[str | Path], out: Path, n_lines: int, timeout: float = 180.0) -> None:
    """Start a batch run and SIGKILL it once `out` holds `n_lines` lines (0: while it loads)."""
    proc = subprocess.Popen(cli_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            have = out.read_bytes().count(b"\n") if out.exists() else 0
            if have >= n_lines and (n_lines or out.exists()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed: make its items slower"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)


def test_sigkill_at_any_point_then_resume_loses_and_duplicates_nothing(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, 8)
    base = ["batch", *MODEL, "--no-progress", "--max-new-tokens", "24", "--bundle", tiny_bundle, "--input", manifest]
    ref = tmp_path / "ref.jsonl"
    res = run_cli(*base, "--output", ref)
    assert res.returncode == 0, res.stderr
    expected = stable(lines(ref))
    out = tmp_path / "killed.jsonl"
    for n in (0, 2, 5):  # while loading, then after 2 and 5 items
        _kill_after([*base, "--output", out], out, n)
        seen = [r["id"] for r in lines(out)]
        assert len(seen) == len(set(seen)), seen
    res = run_cli(*base, "--output", out)
    assert res.returncode == 0, res.stderr
    got = lines(out)
    assert len(got) == 8 and stable(got) == expected  # every item once, the same answers as an unbroken run

    # a writer killed inside its write leaves a torn last line: cut off on resume, and that item runs again
    torn = tmp_path / "torn.jsonl"
    data = ref.read_bytes()
    torn.write_bytes(data[:len(data) - len(data.splitlines()[-1]) // 2 - 1])
    res = run_cli(*base, "--output", torn)
    assert res.returncode == 0 and "torn last line" in res.stderr, res.stderr
    assert "done 1 (failed 0), skipped 7" in res.stderr
    assert stable(lines(torn)) == expected


def test_bad_manifest_rows_are_refused_with_their_line_numbers(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "question": "q"}) + "\n" + "{oops\n" +
                        json.dumps({"question": "no id"}) + "\n")
    out = tmp_path / "r.jsonl"
    res = batch("--bundle", tiny_bundle, "--input", manifest, "--output", out)
    assert_one_line_error(res, manifest, "line 2", "line 3")
    assert not out.exists()


def test_csv_manifest_with_options_scores_the_letter(tiny_bundle: Path, tmp_path: Path) -> None:
    _png(tmp_path / "x.png", 1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,images,question,options,answer\n"
                        "mc1,x.png,Which side?,left|right,A\n"
                        "ft1,,What is 2+2?,,four\n", encoding="utf-8")
    out = tmp_path / "r.jsonl"
    res = batch("--bundle", tiny_bundle, "--input", manifest, "--output", out)
    assert res.returncode == 0, res.stderr
    mc, ft = lines(out)
    assert mc["reference"] == "A" and "letter" in mc and mc["correct"] == (mc["letter"] == "A")
    assert ft["reference"] == "four" and set(ft) >= {"exact_match", "normalised_match"}
    assert ft["tokens"]["image"] == 0


def test_a_second_writer_is_refused_and_retry_errors_reruns_error_lines(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "a.png", 0)
    _png(folder / "b.png", 1)
    out = tmp_path / "r.jsonl"
    long_prompt = "Describe this image in every detail you can see. " * 6  # over 64 tokens with the image
    common = ("--bundle", tiny_bundle, "--input", folder, "--prompt", long_prompt, "--output", out)
    out.touch()
    with out.open("rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert_one_line_error(batch(*common), out, "another run")
    # a context too small for an image: an error line per item (the context is not part of the key)
    res = batch(*common, "--ctx", "64")
    assert res.returncode == 0 and "failed 2" in res.stderr, res.stderr
    assert all(r["status"] == "error" and "context" in r["error"] for r in lines(out))
    assert "skipped 2" in batch(*common).stderr  # an error line is a line: not retried unless asked
    res = batch(*common, "--retry-errors")
    assert res.returncode == 0 and "done 2 (failed 0)" in res.stderr, res.stderr
    assert [r["status"] for r in lines(out)] == ["ok", "ok"]


def test_refusals_before_any_model_loads(tiny_bundle: Path, cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    assert_one_line_error(batch("--bundle", tiny_bundle, "--input", cohort, "--output", out), "--prompt")
    assert_one_line_error(batch("--bundle", tiny_bundle, "--input", tmp_path / "nope", "--output", out, "--prompt",
                                "q"), "nope")
    assert_one_line_error(batch("--bundle", tiny_bundle, "--input", cohort, "--output", out, "--prompt", "q",
                                "--workers", "2"), "--engine ray")
    assert_one_line_error(batch("--bundle", tiny_bundle, "--input", cohort, "--output", out, "--prompt", "q",
                                "--workers", "0"), "--workers")
    assert not out.exists()
    os.mkfifo(tmp_path / "fifo")
    assert_one_line_error(batch("--bundle", tiny_bundle, "--input", cohort, "--output", tmp_path / "fifo",
                                "--prompt", "q"), "fifo")
