"""What hospital IT asks before installing: does it touch the network, what does it log, does it
refuse what would not fit or does not belong together, can it execute code hidden in a model file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import linked_copy

import medgemma_edge
from medgemma_edge import UserError
from medgemma_edge.bundle import MANIFEST
from medgemma_edge.fsutil import sha256_file

CLI = str(Path(sys.executable).with_name("medgemma-edge"))
ROOT = Path(__file__).resolve().parents[1]
# Any attempt to create a socket from Python, even to localhost, kills the process loudly.
NO_NETWORK = """
import socket
class _NoSocket(socket.socket):
    def __init__(self, *a, **k):
        raise SystemExit("NETWORK ATTEMPT: socket() was called")
socket.socket = _NoSocket
socket.create_connection = lambda *a, **k: (_ for _ in ()).throw(SystemExit("NETWORK ATTEMPT"))
"""


def _offline_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "sitecustomize.py").write_text(NO_NETWORK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["PYTHONPATH"] = str(tmp_path)
    return env


def test_run_and_chat_never_open_a_socket(tiny_bundle: Path, xray_png: Path, tmp_path: Path) -> None:
    env = _offline_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.socket()"], env=env, capture_output=True, text=True)
    assert "NETWORK ATTEMPT" in probe.stderr  # the trap works, so a pass below means something
    run = subprocess.run([CLI, "run", "--bundle", str(tiny_bundle), "--image", str(xray_png), "--max-new-tokens", "4",
                          "Describe"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "NETWORK" not in run.stderr, run.stderr
    chat = subprocess.run([CLI, "chat", "--bundle", str(tiny_bundle), "--image", str(xray_png), "--max-new-tokens", "4"],
                          input="Describe\nAnd now?\n", env=env, capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0 and "NETWORK" not in chat.stderr, chat.stderr


def test_runtime_never_imports_torch_or_transformers(tiny_bundle: Path, xray_png: Path, tmp_path: Path) -> None:
    """A workstation install needs neither: run with both made unimportable, through every backend."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise SystemExit(f'RUNTIME IMPORTED {name}')\n"
        "sys.meta_path.insert(0, _Block())\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for encoder, decoder in (("gguf:f16", "gguf:q8_0"), ("onnx:int8", "onnx:int4")):
        out = subprocess.run([CLI, "run", "--bundle", str(tiny_bundle), "--image", str(xray_png), "--encoder", encoder,
                              "--decoder", decoder, "--max-new-tokens", "2", "Describe"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "RUNTIME IMPORTED" not in out.stderr, out.stderr


def test_convert_runs_offline_with_hub_flags_set(tiny_ckpt: Path, tmp_path: Path) -> None:
    env = _offline_env(tmp_path)
    out = subprocess.run([CLI, "convert", str(tiny_ckpt), "-o", str(tmp_path / "b"), "--gguf", "q8_0", "--mmproj", "f16"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    from medgemma_edge.extras import require_convert_extra

    require_convert_extra()
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"


def _dicom_inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A real CT from pydicom's test data, as a file and alone in a folder (calibration images)."""
    from pydicom.data import get_testdata_file

    folder = tmp_path / "dicom"
    folder.mkdir(parents=True)
    ct = folder / "ct.dcm"
    ct.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    return ct, folder


def _offline_commands(tiny_bundle: Path, tiny_ckpt: Path, tmp_path: Path) -> list[tuple[list[str], str | None]]:
    ct, calib = _dicom_inputs(tmp_path)
    return [
        ([CLI, "run", "--bundle", str(tiny_bundle), "--image", str(ct), "--max-new-tokens", "2", "Describe"], None),
        ([CLI, "chat", "--bundle", str(tiny_bundle), "--image", str(ct), "--max-new-tokens", "2"], "Describe\nMore?\n"),
        ([CLI, "render", str(ct), "-o", str(tmp_path / "seen.png")], None),
        ([CLI, "convert", str(tiny_ckpt), "-o", str(tmp_path / "b"), "--gguf", "q8_0", "--mmproj", "",
          "--onnx-vision", "int8_static", "--calibration-images", str(calib)], None),
    ]


def test_dicom_input_and_convert_never_open_a_socket(tiny_bundle: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    """Reading DICOM once imported pydicom's test-data downloader, whose requests/urllib3 bound ::1 at import."""
    env = _offline_env(tmp_path)
    for cmd, stdin in _offline_commands(tiny_bundle, tiny_ckpt, tmp_path):
        out = subprocess.run(cmd, env=env, input=stdin, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0 and "NETWORK" not in out.stderr, (cmd[1], out.stderr)


def test_the_same_commands_run_in_a_network_namespace(tiny_bundle: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    """No interface but a downed loopback: anything that needed the network would fail here."""
    probe = subprocess.run(["unshare", "-rn", sys.executable, "-c",
                            "import socket; socket.create_connection(('127.0.0.1', 9), timeout=2)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "unreachable" in probe.stderr.lower(), probe.stderr  # the namespace isolates
    for cmd, stdin in _offline_commands(tiny_bundle, tiny_ckpt, tmp_path / "netns"):
        out = subprocess.run(["unshare", "-rn", *cmd], input=stdin, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, (cmd[1], out.stderr)


def test_hub_id_is_refused_with_the_way_forward() -> None:
    with pytest.raises(UserError, match="never downloads.*medgemma-edge convert"):
        medgemma_edge.load("google/medgemma-4b-it")


def test_audit_log_holds_hashes_not_text(tiny_bundle: Path, xray_png: Path, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    prompt, system = "Patient John Doe, 54: describe this X-ray", "You are an expert radiologist."
    for extra in ([], ["--audit-include-text"]):
        out = subprocess.run([CLI, "run", "--bundle", str(tiny_bundle), "--image", str(xray_png), "--system", system,
                              "--max-new-tokens", "4", "--audit-log", str(log), *extra, prompt],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    bundle = medgemma_edge.open_bundle(tiny_bundle)
    assert first["bundle_id"] == bundle.manifest_sha256
    assert first["inputs_sha256"] == [sha256_file(xray_png)]
    assert first["artifacts"]["decoder_sha256"] in {a.sha256 for a in bundle.artifacts}
    assert first["tokens"]["image"] == 16 and first["tokens"]["generated"] <= 4
    assert set(first["timings"]) >= {"image_encode_ms", "time_to_first_token_ms"}
    raw = json.dumps(first)
    assert "John" not in raw and "radiologist" not in raw and "prompt" not in first  # no text by default
    assert second["prompt"] == prompt and second["system"] == system and "answer" in second
    assert first["prompt_sha256"] == second["prompt_sha256"]


def test_memory_preflight_refuses_with_both_figures(tiny_bundle: Path) -> None:
    out = subprocess.run([CLI, "run", "--bundle", str(tiny_bundle), "--memory-limit", "0.01", "--max-new-tokens", "2",
                          "Hi"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert re.search(r"needs about [\d.]+ GiB .* only 0\.01 GiB is available.*--force", out.stderr), out.stderr
    forced = subprocess.run([CLI, "run", "--bundle", str(tiny_bundle), "--memory-limit", "0.01", "--force",
                             "--max-new-tokens", "2", "Hi"], capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr


def test_mismatched_parts_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    """An mmproj from another model (different projection width) is named and refused."""
    from medgemma_edge.extras import convert_checkpoint, synthesize

    other = synthesize(tmp_path / "other", size="tiny", seed=1, hidden_size=512)
    other_bundle = convert_checkpoint(other, tmp_path / "other-bundle", ["q8_0"], ["f16"], progress=False)
    mixed = tmp_path / "mixed"
    linked_copy(tiny_bundle, mixed, private=("mmproj-f16.gguf",))
    foreign = other_bundle.path(other_bundle.find("encoder", "gguf:f16"))
    shutil.copy(foreign, mixed / "mmproj-f16.gguf")
    manifest = json.loads((mixed / MANIFEST).read_text())
    for a in manifest["artifacts"]:
        if a["file"] == "mmproj-f16.gguf":
            a["size"], a["sha256"] = foreign.stat().st_size, sha256_file(foreign)  # a consistent but wrong bundle
    (mixed / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="projects to width 512 but the decoder's hidden size is 256"):
        medgemma_edge.load(mixed, encoder="gguf:f16", decoder="gguf:q8_0")


def test_no_pickle_anywhere() -> None:
    """Model files are data, never code: no torch.load, no pickle, and *.bin checkpoints are refused."""
    sources = [p for d in ("medgemma_edge", "convert") for p in (ROOT / d).rglob("*.py")]
    assert sources
    for path in sources:
        text = path.read_text()
        assert not re.search(r"torch\.load\(|pickle\.loads?\(|import pickle|joblib", text), path


def test_pickle_checkpoint_is_refused(tmp_path: Path, tiny_ckpt: Path) -> None:
    from medgemma_edge.extras import convert_checkpoint

    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(tiny_ckpt / "config.json", ckpt / "config.json")
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UserError, match="safetensors only"):
        convert_checkpoint(ckpt, tmp_path / "out", ["f32"], [], progress=False)


def test_intended_use_is_stated(tiny_bundle: Path) -> None:
    help_text = subprocess.run([CLI, "--help"], capture_output=True, text=True).stdout
    assert "not for clinical diagnosis" in help_text
    assert "not for clinical diagnosis" in (ROOT / "README.md").read_text()
    assert "not for clinical diagnosis" in json.loads((tiny_bundle / MANIFEST).read_text())["notice"]
