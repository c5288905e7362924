"""`batch` and `eval` on a Ray cluster that the test starts itself: a head node on this machine (`ray start --head
--block`, offline), the CLI as the driver. Same lines as the local engine; a worker killed mid-run loses no item;
a killed driver's run resumes. Every process the cluster started is stopped at the end, by its pid."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_command, run_cli
from PIL import Image

MODEL = ["--encoder", "onnx:fp32", "--decoder", "gguf:q8_0", "--no-progress"]
VOLATILE = ("timings", "item_s", "host")


@dataclass
class Cluster:
    address: str
    proc: subprocess.Popen
    log: Path


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    ray = Path(sys.executable).with_name("ray")
    if not ray.is_file():
        pytest.fail(f"{ray} is missing: install the cluster extra (pip install -e '.[cluster]')")
    temp = Path(tempfile.mkdtemp(prefix="mgray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    log = temp / "head.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(ray), "start", "--head", "--block", "--port", "0", "--num-cpus", "2",
                                 "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp / "t"),
                                 "--include-dashboard", "false", "--disable-usage-stats"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline, port = time.monotonic() + 180, None
        while port is None:
            found = re.search(r"ray start --address='[^:']+:(\d+)'", log.read_text(errors="replace"))
            if found:
                port = found.group(1)
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start:\n{log.read_text(errors='replace')[-3000:]}")
            else:
                time.sleep(0.2)
        yield Cluster(f"127.0.0.1:{port}", proc, log)
    finally:
        ours = descendants(proc.pid)  # gcs_server, raylet, workers: stopped by pid, never by name
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    rows = []
    for i in range(8):
        path = folder / f"c{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"case{i}", "images": [path.name], "question": f"Describe image {i}."})
    rows.append({"id": "missing", "images": ["no-such-file.png"], "question": "Describe."})
    path = folder / "cohort.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def stable(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in records}


def _args(bundle: Path, manifest: Path, out: Path, *extra: str) -> list[str | Path]:
    return ["batch", *MODEL, "--bundle", bundle, "--input", manifest, "--output", out, "--max-new-tokens", "24",
            "--temperature", "0.8", "--seed", "11", *extra]


@pytest.fixture(scope="module")
def local_reference(tiny_bundle: Path, manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    res = run_cli(*_args(tiny_bundle, manifest, out))
    assert res.returncode == 0, res.stderr
    return stable(lines(out))


def _ray_args(cluster: Cluster) -> list[str]:
    return ["--engine", "ray", "--ray-address", cluster.address, "--workers", "1", "--cpus-per-worker", "1"]


def test_ray_writes_the_same_lines_as_the_local_engine(tiny_bundle: Path, manifest: Path, local_reference: dict,
                                                       cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "ray.jsonl"
    res = run_cli(*_args(tiny_bundle, manifest, out, *_ray_args(cluster)))
    assert res.returncode == 0, res.stderr
    got = lines(out)
    assert len(got) == 9 and stable(got) == local_reference  # seeded sampling: the same answers, item by item
    assert stable(got)["missing"]["status"] == "error"
    again = run_cli(*_args(tiny_bundle, manifest, out, *_ray_args(cluster)))
    assert again.returncode == 0 and "done 0 (failed 0), skipped 9" in again.stderr, again.stderr


def _wait_lines(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the driver ended (exit {proc.returncode}) before {n} lines were written")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"fewer than {n} lines after {timeout} s")


def test_killing_a_worker_mid_run_loses_no_item(tiny_bundle: Path, manifest: Path, local_reference: dict,
                                                cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "ray.jsonl"
    driver = subprocess.Popen(cli_command(*_args(tiny_bundle, manifest, out, *_ray_args(cluster))),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_lines(out, 2, driver)
        actors = [p for p in descendants(cluster.proc.pid) if "ItemWorker" in cmdline(p)]
        assert actors, "no actor process found in the cluster"
        for pid in actors:
            os.kill(pid, signal.SIGKILL)
        assert out.read_bytes().count(b"\n") < 9 and driver.poll() is None  # the kill hit a run in progress
        _, err = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(30)
    assert driver.returncode == 0, err
    got = lines(out)
    assert len(got) == 9 and stable(got) == local_reference  # every item once, with the same answers


def test_the_run_resumes_after_the_driver_is_killed(tiny_bundle: Path, manifest: Path, local_reference: dict,
                                                    cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "ray.jsonl"
    driver = subprocess.Popen(cli_command(*_args(tiny_bundle, manifest, out, *_ray_args(cluster))),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_lines(out, 2, driver)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    written = len(lines(out))
    assert 2 <= written < 9
    res = run_cli(*_args(tiny_bundle, manifest, out, *_ray_args(cluster)))
    assert res.returncode == 0, res.stderr
    assert f"skipped {written}" in res.stderr, res.stderr
    got = lines(out)
    assert len(got) == 9 and stable(got) == local_reference


def test_eval_runs_on_ray_with_the_same_scores(tiny_bundle: Path, cluster: Cluster, tmp_path: Path) -> None:
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": "t1", "question": "Which organ pumps blood?", "options": ["heart", "liver"],
                                "answer": "A"}) + "\n" +
                    json.dumps({"id": "t2", "question": "Two plus two?", "answer": "four"}) + "\n")
    base = ["eval", "--bundle", tiny_bundle, "--decoder", "gguf:q8_0", "--data", data, "--max-new-tokens", "4",
            "--no-progress"]
    assert run_cli(*base, "--out", tmp_path / "local").returncode == 0
    res = run_cli(*base, "--out", tmp_path / "ray", *_ray_args(cluster))
    assert res.returncode == 0, res.stderr
    local, ray = (stable(lines(tmp_path / d / "items.jsonl")) for d in ("local", "ray"))
    assert local == ray and set(ray) == {"t1", "t2"}
    assert json.loads((tmp_path / "ray" / "eval.json").read_text())["artifacts"][0]["scored"] == 2
