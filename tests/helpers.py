"""Helpers shared by the test modules (imported from here, never from another test file)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medgemma_edge.bundle.precisions import names

CLI = Path(sys.executable).with_name("medgemma-edge")
TIMEOUT_S = 300

# Every precision the session bundle holds, from the one precision table. int8_static needs
# calibration images, so its tests convert it themselves.
ALL_GGUF = list(names("decoder", "gguf"))
ALL_MMPROJ = list(names("encoder", "gguf"))
ALL_ONNX_VISION = [p for p in names("encoder", "onnx") if p != "int8_static"]
ALL_ONNX_DECODER = list(names("decoder", "onnx"))
ENCODERS = [f"gguf:{p}" for p in ALL_MMPROJ] + [f"onnx:{p}" for p in ALL_ONNX_VISION]
DECODERS = [f"gguf:{p}" for p in ALL_GGUF] + [f"onnx:{p}" for p in ALL_ONNX_DECODER]


@functools.cache
def openvino_plugin_kinds() -> list[str]:
    """The device kinds OpenVINO's plugin lists here (CPU, GPU, NPU; none on an AMD CPU: onnxruntime-ep-openvino
    1.8 lists Intel devices only), asked in a fresh process: registering the plugin in the test process would
    decide which libopenvino every later test loads."""
    script = ("import json; from medgemma_edge.backends.onnx.session import plugin_devices; "
              "print(json.dumps([k for _, k in plugin_devices('OpenVINOExecutionProvider')]))")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def linked_copy(src: Path, dst: Path, private: tuple[str, ...] = ()) -> Path:
    """A copy of a bundle or checkpoint folder that costs no disk: large files are hard links.

    The tiny bundle is about 2 GB (every precision of a 262k-row vocabulary), and CI's disk is shared.
    Small files (manifest, config) and the `private` names are real copies, so a test may rewrite
    them; a hard-linked file must only be replaced, never written in place.
    """
    def place(s: str, d: str) -> None:
        if os.path.getsize(s) < (1 << 20) or Path(s).name in private:
            shutil.copy2(s, d)
        else:
            os.link(s, d)

    return Path(shutil.copytree(src, dst, copy_function=place))


def cli_command(*args: str | Path) -> list[str]:
    """The argv a user types; fails loudly (never skips) when the console script is not installed."""
    if not CLI.is_file():
        pytest.fail(f"console script {CLI} is missing: install the package (pip install -e .) into this venv")
    return [str(CLI), *map(str, args)]


def run_cli(*args: str | Path, cwd: Path | None = None, input: str | bytes | None = None,
            timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run `medgemma-edge ARGS` as a user would (installed console script, own process, captured output)."""
    if isinstance(input, bytes):
        res = subprocess.run(cli_command(*args), capture_output=True, cwd=cwd, input=input, timeout=timeout)
        return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode("utf-8", "replace"),
                                           res.stderr.decode("utf-8", "replace"))
    return subprocess.run(cli_command(*args), capture_output=True, text=True, cwd=cwd, input=input, timeout=timeout)


def assert_one_line_error(res: subprocess.CompletedProcess[str], *mentions: str | Path) -> str:
    """The rule: non-zero exit, exactly one non-empty stderr line `error: ...` naming each of `mentions`."""
    shown = f"exit {res.returncode}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    assert res.returncode != 0, shown
    assert "Traceback" not in res.stdout + res.stderr, shown
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, shown
    line = lines[0]
    assert line.startswith("error:"), shown
    assert "internal error" not in line, shown  # the catch-all is a bug report, not a clear message
    for m in mentions:
        assert str(m) in line, f"{m!s} not named in: {line}"
    return line


def assert_no_partials(out: Path) -> None:
    """Nothing half-written: neither the target nor any hidden `.NAME.partial*` sibling exists."""
    leftovers = sorted(p.name for p in out.parent.glob(f".{out.name}.partial*"))
    leftovers += sorted(p.name for p in out.parent.glob(f"{out.name}.partial*"))
    assert not leftovers, leftovers


def decoder_bound(artifact_id: str) -> tuple[float, float]:
    """(mean KL bound, top-1 floor) of a decoder precision, from the precision table."""
    from medgemma_edge.bundle.precisions import PRECISIONS

    p = PRECISIONS["decoder"][artifact_id]
    assert p.min_top1 is not None
    return p.max_kl, p.min_top1


def encoder_extra(artifact_id: str) -> float:
    """The mean KL an encoder precision may add on top of its decoder's bound."""
    from medgemma_edge.bundle.precisions import PRECISIONS

    return PRECISIONS["encoder"][artifact_id].max_kl


def artifact_path(bundle: Path, kind: str, artifact_id: str) -> Path:
    """Where the manifest (the source of truth, never a file-name guess) puts an artifact."""
    from medgemma_edge.bundle import open_bundle

    b = open_bundle(bundle)
    return b.path(b.find(kind, artifact_id))


def tampered_copy(bundle: Path, dst: Path, kind: str, artifact_id: str, edit) -> tuple[Path, Path]:
    """A linked copy of `bundle` whose artifact is edited in place by `edit(path)`, with the manifest's size and
    sha256 updated to match: what a malicious bundle (or --no-verify on a damaged one) hands the native libraries."""
    import json

    from medgemma_edge.fsutil import sha256_file

    name = artifact_path(bundle, kind, artifact_id).name
    copy = linked_copy(bundle, dst, private=(name,))
    victim = copy / name
    edit(victim)
    manifest = json.loads((copy / "manifest.json").read_text())
    for a in manifest["artifacts"]:
        if a["file"] == name:
            a["size"], a["sha256"] = victim.stat().st_size, sha256_file(victim)
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return copy, victim


def set_gguf_value(path: Path, key: str, value: int | float) -> None:
    """Overwrite one numeric GGUF metadata value in place (same type, same size)."""
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    reader.fields[key].parts[-1][0] = value
    reader.data.flush()  # type: ignore[attr-defined]


class ServeProcess:
    """`medgemma-edge serve ARGS --port 0` in its own process: the announced address, bounded waits, and a stop
    that never leaves it running (SIGTERM, then SIGKILL)."""

    def __init__(self, *args: str | Path, wait_ready: bool = True, timeout: float = 120.0) -> None:
        import re
        import threading
        import time

        self.proc = subprocess.Popen(cli_command("serve", *args, "--port", "0"), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        self.url = ""
        while not self.url:
            found = [m for line in list(self.lines) if (m := re.search(r"listening on (http://\S+)", line))]
            if found:
                self.url = found[0].group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not start:\n{self.stderr}")
            else:
                time.sleep(0.05)
        if wait_ready:
            self.wait_ready(deadline - time.monotonic())

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120.0) -> None:
        import time
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"the server did not become ready:\n{self.stderr}")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(20)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")
