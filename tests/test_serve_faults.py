"""The server while loading (/health 503, then 200), with CORS turned on, and killed with SIGKILL under load:
it serves again after a restart, and its audit log holds only whole lines (a line cut short by a kill
inside its write is dropped when the log is opened again)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import openai
import requests
from helpers import ServeProcess

KEY = "faults-test-key-0123456789abcdef"
ORIGIN = "http://ward-viewer.example"


def test_health_is_503_while_loading_then_200_and_cors_only_for_the_given_origin(tiny_bundle: Path,
                                                                                 tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    server = ServeProcess("--bundle", tiny_bundle, "--api-key-file", keys, "--cors-origin", ORIGIN, wait_ready=False)
    try:
        r = requests.get(server.url + "/health", timeout=10)  # hashing and loading the artifacts takes seconds
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        busy = requests.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "loading" and busy.headers["retry-after"]
        server.wait_ready()
        r = requests.get(server.url + "/health", timeout=10)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        auth = {"Authorization": f"Bearer {KEY}"}
        ok = requests.get(server.url + "/v1/models", headers={**auth, "Origin": ORIGIN}, timeout=10)
        assert ok.headers["access-control-allow-origin"] == ORIGIN
        pre = requests.options(server.url + "/v1/chat/completions", timeout=10, headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
        other = requests.get(server.url + "/v1/models", headers={**auth, "Origin": "http://elsewhere.example"}, timeout=10)
        assert "access-control-allow-origin" not in other.headers
    finally:
        assert server.stop() == 0, server.stderr


def _whole_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), data[-200:]
    return [json.loads(line) for line in data.decode().splitlines()]


def test_sigkill_under_load_then_restart_serves_again_with_only_whole_audit_lines(tiny_bundle: Path,
                                                                                   tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    args = ("--bundle", tiny_bundle, "--parallel", "2", "--audit-log", audit, "--audit-include-text")
    server = ServeProcess(*args)
    answered = threading.Semaphore(0)

    def client() -> None:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
        for _ in range(50):
            try:
                c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 2000}], max_tokens=4)
                answered.release()
            except openai.APIError:
                return  # the server is gone
    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(6):
        assert answered.acquire(timeout=60), server.stderr
    server.kill()  # SIGKILL: no shutdown, mid-request
    for t in threads:
        t.join(60)
    before = _whole_lines(audit)
    assert len(before) >= 6 and all(e["status"] == 200 for e in before)
    with audit.open("ab") as f:  # what a kill inside a write leaves: part of a line
        f.write(b'{"time": "2026-01-01T00:00:00", "command": "serve", "request_id": "torn')
    again = ServeProcess(*args)
    try:
        assert "dropped the last" in again.stderr  # the torn tail is gone, said in one line
        c = openai.OpenAI(base_url=again.url + "/v1", api_key="none", max_retries=0, timeout=60)
        done = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Still there?"}], max_tokens=3)
        assert done.choices[0].finish_reason == "length"
        time.sleep(0.1)
        after = _whole_lines(audit)
        assert after[:len(before)] == before and len(after) == len(before) + 1
        assert after[-1]["prompt"] == "Still there?"  # --audit-include-text
    finally:
        assert again.stop() == 0, again.stderr
