"""DICOM through the product: `run`, `chat` and `render` on pydicom's real test files, and no PHI out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from medgemma_edge.inputs.dicom import render
from medgemma_edge.inputs.images import resize_square

CLI = str(Path(sys.executable).with_name("medgemma-edge"))
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "ReferringPhysicianName",
            "StudyDate", "AccessionNumber")


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], input=stdin, capture_output=True, text=True, timeout=300)


def _phi(path: Path) -> list[str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return [str(ds.get(tag)) for tag in PHI_TAGS if ds.get(tag) not in (None, "") and len(str(ds.get(tag))) >= 4]


def test_run_on_ct_and_extensionless_mr(tiny_bundle: Path, tmp_path: Path) -> None:
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    mr = tmp_path / "MR0001"  # hospital exports often have no extension: detected by the DICM magic
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), mr)
    log = tmp_path / "audit.jsonl"
    out = _cli("run", "--bundle", str(tiny_bundle), "--image", str(ct), "--image", str(mr), "--max-new-tokens", "3",
               "--dicom-context", "--audit-log", str(log), "--audit-include-text", "--json", "Compare these studies")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tokens"]["image"] == 32
    entry = json.loads(log.read_text())
    assert entry["prompt"] == "Modality: CT.\nModality: MR.\nCompare these studies"  # opt-in context, nothing else
    shown = out.stdout + out.stderr + log.read_text()
    for value in _phi(ct) + _phi(mr):
        assert value not in shown, "a DICOM tag value reached the output or the audit log"


def test_context_is_opt_in(tiny_bundle: Path, tmp_path: Path) -> None:
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    log = tmp_path / "audit.jsonl"
    out = _cli("run", "--bundle", str(tiny_bundle), "--image", str(ct), "--max-new-tokens", "2", "--audit-log", str(log),
               "--audit-include-text", "Describe")
    assert out.returncode == 0, out.stderr
    assert json.loads(log.read_text())["prompt"] == "Describe"


def test_render_shows_what_the_model_sees(tmp_path: Path) -> None:
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    out = _cli("render", str(ct), "-o", str(tmp_path / "ct.png"), "--size", "64")
    assert out.returncode == 0, out.stderr
    written = np.asarray(Image.open(tmp_path / "ct.png"))
    np.testing.assert_array_equal(written, resize_square(ct, 64))
    expected = np.asarray(render(ct).resize((64, 64), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(written, expected)


def test_frame_selection_and_errors(tiny_bundle: Path, tmp_path: Path) -> None:
    multi = Path(pydicom.data.get_testdata_file("rtdose.dcm"))
    n = int(pydicom.dcmread(multi, stop_before_pixels=True).NumberOfFrames)
    first = _cli("render", str(multi), "-o", str(tmp_path / "frame0.png"), "--frame", "0")
    assert first.returncode == 0, first.stderr
    bad = _cli("run", "--bundle", str(tiny_bundle), "--image", str(multi), "--dicom-frame", str(n + 5), "x")
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:") and str(multi) in lines[0]


def test_chat_with_dicom(tiny_bundle: Path) -> None:
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    out = _cli("chat", "--bundle", str(tiny_bundle), "--image", ct, "--max-new-tokens", "2", stdin="Describe\nAnd?\n")
    assert out.returncode == 0, out.stderr
