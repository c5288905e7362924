"""Conversion is atomic: a `convert` killed at any moment leaves no bundle that `load` or `info` accepts.

A hospital workstation loses power, or an operator hits Ctrl-C mid-conversion; the next `run` must not
pick up a half-written bundle. The converter writes into `.NAME.partial-PID` beside the target and
renames it into place only once the manifest is written. We SIGKILL a real `medgemma-edge convert`
(no cleanup handler can run) at several points, from the first instant of the partial folder to the
final hashing, and check the target never appears, then that a later conversion succeeds and clears
the dead partial folders.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from medgemma_edge import UserError, open_bundle
from helpers import assert_one_line_error, cli_command, run_cli

GGUF, MMPROJ = ["f32", "f16", "q8_0", "q4_k_m"], ["f32", "f16"]
CONVERT_ARGS = ["--gguf", ",".join(GGUF), "--mmproj", ",".join(MMPROJ)]
SMALL_ARGS = ["--gguf", "q8_0", "--mmproj", "f16"]
# Kill once the partial folder holds this many .gguf files: at once; the f32 decoder being written;
# the first quantized decoder being written; every artifact written, the converter now hashing them.
KILL_AFTER_N_GGUF = (0, 1, 2, len(GGUF) + len(MMPROJ))
DEADLINE_S = 300
POLL_S = 0.005


def _n_gguf(folder: Path) -> int:
    """How far the converter got: .gguf files (complete or not) in its partial folder; -1 when absent."""
    try:
        return sum(1 for p in folder.iterdir() if p.suffix == ".gguf")
    except FileNotFoundError:
        return -1  # not created yet, or already renamed into place


def _partials(target: Path) -> list[Path]:
    """Hidden work folders of conversions into `target`, finished or dead."""
    return sorted(target.parent.glob(f".{target.name}.partial-*"))


def convert_and_kill(ckpt: Path, target: Path, n_gguf: int, args: list[str]) -> Path:
    """Start `convert`, SIGKILL it once its partial folder holds `n_gguf` .gguf files; return that folder.

    Fails (never skips) when the conversion ends before the kill point: then nothing was tested.
    """
    log = target.parent / f"convert-kill-{n_gguf}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(cli_command("convert", ckpt, "-o", target, *args),
                                stdout=subprocess.DEVNULL, stderr=err)
    partial = target.parent / f".{target.name}.partial-{proc.pid}"  # the console script is the converting process
    try:
        deadline = time.monotonic() + DEADLINE_S
        while _n_gguf(partial) < n_gguf:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"could not kill convert mid-way (exit {proc.returncode}) before {partial.name} held "
                            f"{n_gguf} .gguf files; stderr:\n{log.read_text()[-2000:]}")
            time.sleep(POLL_S)
    finally:
        proc.kill()  # SIGKILL: no handler of the converter can run, as on a power cut
        proc.wait()  # reap it: a zombie still counts as alive for the converter's stale-PID check
    assert proc.returncode == -signal.SIGKILL, f"convert finished (exit {proc.returncode}) before the kill"
    assert partial.is_dir(), f"{partial} vanished: the kill did not land mid-conversion"
    return partial


def assert_no_bundle_at(target: Path, partial: Path) -> None:
    """Neither the API nor the CLI accepts the target, nor the dead partial folder; the target is absent."""
    assert not target.exists(), sorted(p.name for p in target.iterdir())
    for folder in (target, partial):
        with pytest.raises(UserError):
            open_bundle(folder)
    assert_one_line_error(run_cli("info", target), target)


def test_killed_convert_leaves_nothing_loadable(tiny_ckpt: Path, tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    for n in KILL_AFTER_N_GGUF:
        partial = convert_and_kill(tiny_ckpt, target, n, CONVERT_ARGS)
        assert_no_bundle_at(target, partial)
        # each conversion removes the partial folders of dead earlier ones before starting its own
        assert _partials(target) == [partial], [p.name for p in _partials(target)]

    done = run_cli("convert", tiny_ckpt, "-o", target, *CONVERT_ARGS)
    assert done.returncode == 0, done.stderr[-2000:]
    checked = run_cli("info", target)
    assert checked.returncode == 0 and "all artifacts match" in checked.stdout, checked.stdout + checked.stderr
    assert {a.id for a in open_bundle(target).artifacts} == {f"gguf:{p}" for p in GGUF + MMPROJ}
    assert not _partials(target), [p.name for p in _partials(target)]


def test_killed_overwrite_keeps_the_old_bundle(tiny_ckpt: Path, tmp_path: Path) -> None:
    """--overwrite promises to replace a bundle only once the new one is complete."""
    target = tmp_path / "bundle"
    first = run_cli("convert", tiny_ckpt, "-o", target, *SMALL_ARGS)
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = (target / "manifest.json").read_bytes()

    convert_and_kill(tiny_ckpt, target, 1, [*SMALL_ARGS, "--overwrite"])
    assert (target / "manifest.json").read_bytes() == manifest
    checked = run_cli("info", target)
    assert checked.returncode == 0 and "all artifacts match" in checked.stdout, checked.stdout + checked.stderr
