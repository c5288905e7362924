"""`medgemma-edge validate`: real transformers, llama.cpp and ONNX Runtime on the tiny bundle, no mocks.

validate writes into the bundle, so every test works on its own copy of the session bundle.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import decoder_bound, linked_copy

from medgemma_edge.bundle import MANIFEST, open_bundle
from medgemma_edge.fsutil import sha256_file
from medgemma_edge.cli import main
from medgemma_edge.extras import synthesize


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main([*args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    return linked_copy(tiny_bundle, tmp_path / "bundle")


@pytest.fixture(scope="module")
def validated(tiny_bundle: Path, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """One run over every artifact (one JSON-listed prompt, text-only and with the built-in image)."""
    work = tmp_path_factory.mktemp("validated")
    bundle = linked_copy(tiny_bundle, work / "bundle")
    (work / "prompts.json").write_text(json.dumps(["Describe this X-ray", "  "]))
    capture = pytest.MonkeyPatch()  # module scope has no capsys: run the CLI with stdout captured by hand
    out = io.StringIO()
    capture.setattr(sys, "stdout", out)
    try:
        main(["validate", "--bundle", str(bundle), "--reference", str(tiny_ckpt), "--prompts",
              str(work / "prompts.json"), "--max-new-tokens", "2"])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        capture.undo()
    return bundle, code, out.getvalue()


def _report(bundle: Path) -> tuple[dict, dict]:
    entry = [r for r in json.loads((bundle / MANIFEST).read_text())["reports"] if r["kind"] == "validation"]
    assert len(entry) == 1  # a new run replaces the previous report
    report = json.loads((bundle / entry[0]["files"][0]["file"]).read_text())
    return entry[0], report


def test_report_stored_in_bundle_and_bundle_still_valid(validated: tuple[Path, int, str], tiny_bundle: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    bundle, code, out = validated
    assert code == 0 and "# Fidelity report: PASSED" in out
    entry, report = _report(bundle)
    for f in entry["files"]:
        assert sha256_file(bundle / f["file"]) == f["sha256"] and (bundle / f["file"]).stat().st_size == f["size"]
    assert {Path(f["file"]).name for f in entry["files"]} == {"report.json", "report.md", "fidelity.png"}
    assert entry["passed"] and entry["reference"]["same_as_bundle_source"]
    before = json.loads((tiny_bundle / MANIFEST).read_text())
    after = json.loads((bundle / MANIFEST).read_text())
    assert {k: v for k, v in after.items() if k != "reports"} == before  # every existing field kept as it was
    open_bundle(bundle).verify()
    assert _run(capsys, "info", str(bundle))[0] == 0
    f32 = next(r for r in report["artifacts"] if r["kind"] == "decoder" and r["artifact"] == "gguf:f32")
    assert f32["text"]["mean_kl"] < decoder_bound("gguf:f32")[0] and f32["image"]["mean_kl"] < decoder_bound("gguf:f32")[0]
    assert f32["greedy"] == {"exact": 1.0, "prefix_mean": 2.0, "reference_tokens_mean": 2.0, "prompts": 2}


def test_every_artifact_has_figures(validated: tuple[Path, int, str]) -> None:
    bundle, _, out = validated
    _, report = _report(bundle)
    rows = {(r["kind"], r["artifact"]): r for r in report["artifacts"]}
    assert set(rows) == {(a.kind, a.id) for a in open_bundle(bundle).artifacts}
    for (kind, _), r in rows.items():
        kl = next(c for c in r["checks"] if c["figure"] == "image mean KL")
        assert kl["value"] == r["image"]["mean_kl"] and 0 < kl["value"] <= r["image"]["max_kl"], r["artifact"]
        assert kl["passed"] is (None if kl["bound"] is None else True) and r["image"]["positions"] > 0
        if kind == "decoder":
            assert r["text"]["positions"] > 0 and 0 <= r["greedy"]["exact"] <= 1
        else:
            assert 0.99 < r["features"]["cosine_min"] <= r["features"]["cosine_mean"] <= 1 + 1e-6
    assert rows[("encoder", "gguf:f32")]["checks"][1]["passed"] is None  # mmproj: no cosine floor in any table
    assert "no threshold" in out


def test_rerun_replaces_the_report(validated: tuple[Path, int, str], tmp_path: Path, tiny_ckpt: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    bundle = linked_copy(validated[0], tmp_path / "bundle")
    first = bundle / Path(_report(bundle)[0]["files"][0]["file"]).parent
    prompts, images = tmp_path / "prompts.txt", tmp_path / "images"
    prompts.write_text("Is there a pneumothorax?\n\n")
    images.mkdir()
    shutil.copy(first / "fidelity.png", images / "any.png")  # RGBA, 1200x450: stretched like any film
    code, out, _ = _run(capsys, "validate", "--bundle", str(bundle), "--reference", str(tiny_ckpt), "--json",
                        "--artifacts", "encoder:gguf:f16", "--prompts", str(prompts), "--images", str(images),
                        "--max-new-tokens", "2")
    assert code == 0 and json.loads(out)["inputs"]["cases"][1]["image"] == str(images / "any.png")
    assert not first.exists() and _report(bundle)[1]["artifacts"][0]["artifact"] == "gguf:f16"
    open_bundle(bundle).verify()


def test_another_checkpoint_fails_with_exit_4(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = synthesize(tmp_path / "seed1", size="tiny", seed=1, progress=False)
    (tmp_path / "one.txt").write_text("Describe this X-ray\n")
    code, _, err = _run(capsys, "validate", "--bundle", str(bundle), "--reference", str(other), "--prompts",
                        str(tmp_path / "one.txt"), "--artifacts", "decoder:gguf:f32", "--max-new-tokens", "2")
    assert code == 4
    assert "FAIL decoder gguf:f32: text mean KL" in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "fidelity check(s) failed" in err
    entry, report = _report(bundle)  # the failing report is stored all the same
    assert not entry["passed"] and not report["reference"]["same_as_bundle_source"]


@pytest.mark.parametrize("case", ["missing reference", "other shape", "empty images", "empty prompts", "unknown artifact"])
def test_bad_input_is_one_line_and_leaves_bundle_unchanged(case: str, bundle: Path, tiny_ckpt: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    args = ["validate", "--bundle", str(bundle), "--reference", str(tiny_ckpt)]
    if case == "missing reference":
        args[-1], expect = str(tmp_path / "nope"), "reference checkpoint folder not found"
    elif case == "other shape":
        args[-1] = str(synthesize(tmp_path / "wide", size="tiny", intermediate_size=768, progress=False))
        expect = "text.intermediate_size is 768 but the bundle's is 512"
    elif case == "empty images":
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "notes.txt").write_text("no images here")
        args += ["--images", str(tmp_path / "imgs")]
        expect = "no PNG/JPEG/DICOM images"
    elif case == "empty prompts":
        (tmp_path / "p.txt").write_text("\n  \n")
        args += ["--prompts", str(tmp_path / "p.txt")]
        expect = "no prompts in the file"
    else:
        args += ["--artifacts", "gguf:q3_k"]
        expect = "--artifacts 'gguf:q3_k': not in"
    manifest = (bundle / MANIFEST).read_bytes()
    code, out, err = _run(capsys, *args)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and expect in err, err
    assert (bundle / MANIFEST).read_bytes() == manifest and not (bundle / "validation").exists()
