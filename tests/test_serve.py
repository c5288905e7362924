"""`medgemma-edge serve` on the tiny bundle, through the official `openai` client and plain HTTP: answers equal
`run`'s, images as data: URLs (PNG, DICOM) and file:// inside --allow-dir, keys, limits, errors in OpenAI's
format, metrics, the audit log, a client leaving mid-stream, and schemathesis against /openapi.json.

The server runs the gguf:f32 decoder, whose logits do not depend on how a prompt is split between a slot's
reused cache and the new prefill (quantized CPU kernels do: see test_serve_load.py), so answers equal `run`'s."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
from helpers import ServeProcess, assert_one_line_error, run_cli
from PIL import Image

KEY = "serve-test-key-0123456789abcdef"
DECODER = "gguf:f32"
QUESTION = "Describe this X-ray"


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def image_message(text: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def dicom_file() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="module")
def served(tiny_bundle: Path, xray_png: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("serve")
    keys = tmp / "keys.txt"
    keys.write_text(f"# one key per line\n{KEY}\n")
    keys.chmod(0o600)
    allowed = tmp / "allowed"
    allowed.mkdir()
    (allowed / "cxr.png").write_bytes(xray_png.read_bytes())
    (allowed / "escape.png").symlink_to(xray_png)  # inside by name, outside once resolved
    audit = tmp / "audit.jsonl"
    server = ServeProcess("--bundle", tiny_bundle, "--decoder", DECODER, "--api-key-file", keys, "--allow-dir", allowed, "--audit-log", audit,
                          "--parallel", "2", "--max-queue", "2", "--max-body-mb", "1", "--max-images", "2",
                          "--ctx", "512")
    yield {"server": server, "url": server.url, "audit": audit, "allowed": allowed, "bundle": tiny_bundle}
    assert server.stop() == 0, server.stderr
    assert "Traceback" not in server.stderr, server.stderr


@pytest.fixture(scope="module")
def client(served: dict) -> openai.OpenAI:
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def run_answer(bundle: Path, *args: str | Path, tokens: int = 8) -> dict:
    res = run_cli("run", "--bundle", bundle, "--decoder", DECODER, "--json", "--max-new-tokens", str(tokens), *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", headers=auth(), timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or
               line.startswith(name + "{"))


def test_plain_and_streaming_answers_equal_run(client: openai.OpenAI, tiny_bundle: Path) -> None:
    expected = run_answer(tiny_bundle, "What is a pneumothorax?")
    raw = client.chat.completions.with_raw_response.create(
        model="any", messages=[{"role": "user", "content": "What is a pneumothorax?"}], max_tokens=8)
    done = raw.parse()
    assert len(raw.headers["x-request-id"]) == 32
    assert done.choices[0].message.content == expected["text"]
    assert done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == expected["tokens"]["prompt"] and done.usage.completion_tokens == 8
    stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "What is a pneumothorax?"}],
                                            max_tokens=8, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


def test_png_and_dicom_data_urls_answer_as_run(client: openai.OpenAI, tiny_bundle: Path, xray_png: Path,
                                               dicom_file: Path) -> None:
    for path, mime in ((xray_png, "image/png"), (dicom_file, "application/dicom")):
        expected = run_answer(tiny_bundle, "--image", path, QUESTION)
        done = client.chat.completions.create(model="any", messages=image_message(QUESTION, data_url(path, mime)),
                                              max_tokens=8)
        assert done.choices[0].message.content == expected["text"], mime
        assert done.usage.prompt_tokens_details.image_tokens == expected["tokens"]["image"] == 16


def test_follow_up_encodes_nothing_and_lands_on_its_own_slot(client: openai.OpenAI, served: dict,
                                                             xray_png: Path) -> None:
    url = served["url"]
    messages = image_message("Is there an effusion?", data_url(xray_png, "image/png"))
    first = client.chat.completions.create(model="any", messages=messages, max_tokens=6)
    # another conversation in between takes the other slot (used longest ago), not this one's cache
    client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Unrelated question"}], max_tokens=4)
    encodes = metric(url, "medgemma_image_encodes_total")
    follow = client.chat.completions.create(model="any", max_tokens=6, messages=[
        *messages, {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And the heart size?"}])
    assert metric(url, "medgemma_image_encodes_total") == encodes  # the image came from the embedding cache
    assert follow.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens  # only the new turn prefilled


def test_sampler_fields_stop_schema_and_thinking_pass_through(client: openai.OpenAI, tiny_bundle: Path) -> None:
    ask = [{"role": "user", "content": "What is a pneumothorax?"}]
    full = client.chat.completions.create(model="any", messages=ask, max_tokens=8).choices[0].message.content
    cut = full[len(full) // 2:len(full) // 2 + 3]  # text from the middle of the greedy answer ends it there
    stopped = client.chat.completions.create(model="any", messages=ask, max_tokens=8, stop=[cut]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content == full[:full.index(cut)]
    schema = {"type": "object", "properties": {"side": {"enum": ["left", "right"]}}, "required": ["side"],
              "additionalProperties": False}
    done = client.chat.completions.create(model="any", messages=ask, max_tokens=16, response_format={
        "type": "json_schema", "json_schema": {"name": "side", "schema": schema}})
    assert json.loads(done.choices[0].message.content)["side"] in ("left", "right")
    thought = client.chat.completions.create(model="any", messages=ask, max_tokens=8,
                                             extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    expected = run_answer(tiny_bundle, "--thinking", "What is a pneumothorax?")
    assert thought.choices[0].message.content == expected["text"]
    assert (getattr(thought.choices[0].message, "reasoning_content", None) or "") == expected["reasoning"]


def test_refusals_are_the_clients_exception_types(served: dict, client: openai.OpenAI, xray_png: Path,
                                                  tmp_path: Path) -> None:
    url = served["url"]
    ask = lambda c, messages, **kw: c.chat.completions.create(model="any", messages=messages, **kw)  # noqa: E731
    with pytest.raises(openai.AuthenticationError) as e:
        ask(client.with_options(default_headers={"Authorization": ""}), [{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401
    with pytest.raises(openai.PermissionDeniedError):
        ask(openai.OpenAI(base_url=url + "/v1", api_key=KEY[:-1] + "X", max_retries=0), [{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [{"role": "user", "content": "hi"}], max_tokens=600)  # --ctx 512
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, image_message("hi", "https://example.org/cxr.png"))
    assert "never downloads" in e.value.message and "\n" not in e.value.message
    png = data_url(xray_png, "image/png")
    three = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}] * 3}]
    with pytest.raises(openai.BadRequestError, match="more than 2 images"):
        ask(client, three)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 MP declared in a few kB: refused from the header
    with pytest.raises(openai.BadRequestError, match="too large, refused before decoding"):
        ask(client, image_message("hi", data_url(bomb, "image/png")))
    with pytest.raises(openai.BadRequestError, match="declared as png"):
        ask(client, image_message("hi", "data:image/png;base64," + base64.b64encode(b"\xff\xd8\xff" + b"0" * 64).decode()))
    with pytest.raises(openai.BadRequestError, match="roles must alternate"):
        ask(client, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(openai.BadRequestError, match="n: "):
        ask(client, [{"role": "user", "content": "hi"}], n=2)
    big = "data:image/png;base64," + "A" * (1 << 21)  # --max-body-mb 1
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, image_message("hi", big))
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    r = requests.get(url + "/v1/nothing", headers=auth(), timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_file_urls_only_inside_allow_dir(client: openai.OpenAI, served: dict, xray_png: Path, tiny_bundle: Path) -> None:
    expected = run_answer(tiny_bundle, "--image", xray_png, QUESTION)
    inside = (served["allowed"] / "cxr.png").as_uri()
    done = client.chat.completions.create(model="any", messages=image_message(QUESTION, inside), max_tokens=8)
    assert done.choices[0].message.content == expected["text"]
    for url in (xray_png.as_uri(), (served["allowed"] / "escape.png").as_uri(), (served["allowed"] / ".." / "x.png").as_uri()):
        with pytest.raises(openai.BadRequestError, match="outside the folders"):
            client.chat.completions.create(model="any", messages=image_message(QUESTION, url), max_tokens=2)


def test_health_needs_no_key_and_reveals_nothing_while_the_rest_needs_it(served: dict) -> None:
    url = served["url"]
    r = requests.get(url + "/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"} and "server" not in r.headers
    for path in ("/", "/metrics", "/v1/models", "/openapi.json"):
        assert requests.get(url + path, timeout=10).status_code == 401, path
        assert requests.get(url + path, headers={"Authorization": "Bearer wrong-key-wrong-key"}, timeout=10).status_code == 403
        assert requests.get(url + path, headers=auth(), timeout=10).status_code == 200, path
    # the page's way in: HTTP Basic, the key as password
    assert requests.get(url + "/v1/models", auth=("anyone", KEY), timeout=10).status_code == 200
    models = requests.get(url + "/v1/models", headers=auth(), timeout=10).json()["data"]
    assert [a["id"] for a in models[0]["artifacts"] if a["loaded"]] == [DECODER, "gguf:f16"]
    # a page on another site that resolved its name to 127.0.0.1 (DNS rebinding) is refused
    assert requests.get(url + "/health", headers={"Host": "evil.example"}, timeout=10).status_code == 400


def test_cors_is_off_by_default(served: dict) -> None:
    url, origin = served["url"], {"Origin": "http://ward.example"}
    r = requests.get(url + "/v1/models", headers={**auth(), **origin}, timeout=10)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = requests.options(url + "/v1/chat/completions", timeout=10, headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert "access-control-allow-origin" not in pre.headers


def test_metrics(served: dict, client: openai.OpenAI, xray_png: Path) -> None:
    url = served["url"]
    png = data_url(xray_png, "image/png")
    for _ in range(2):
        client.chat.completions.create(model="any", messages=image_message("Metrics?", png), max_tokens=3)
    requests.get(url + "/v1/models", headers={"Authorization": "Bearer wrong-key-wrong-key"}, timeout=10)
    text = requests.get(url + "/metrics", headers=auth(), timeout=10).text
    for name in ("medgemma_requests_total", "medgemma_errors_total", "medgemma_queue_depth", "medgemma_slots_busy",
                 "medgemma_tokens_total", "medgemma_time_to_first_token_seconds_bucket",
                 "medgemma_time_per_output_token_seconds_bucket", "medgemma_image_cache_hits_total"):
        assert name in text, name
    assert metric(url, 'medgemma_errors_total{kind="invalid_api_key"}') >= 1
    assert metric(url, "medgemma_image_cache_hits_total") >= 1  # the second request encoded nothing
    assert metric(url, "medgemma_time_to_first_token_seconds_count") >= 2
    assert metric(url, 'medgemma_tokens_total{kind="image"}') >= 32
    assert "Metrics?" not in text and "describe" not in text.lower()


def test_a_client_leaving_mid_stream_frees_its_slot_within_a_second(served: dict) -> None:
    url = served["url"]
    host, port = url.rsplit("/", 1)[-1].split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "Write a long report"}], "stream": True}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:  # up to the context: many seconds
        sock.sendall(head + body)
        seen = b""
        while seen.count(b'"content"') < 4:
            seen += sock.recv(4096)
        assert metric(url, "medgemma_slots_busy") >= 1
        rid = re.search(rb"x-request-id: ([0-9a-f]{32})", seen).group(1).decode()
    left = time.monotonic()  # the client is gone without reading the rest
    while metric(url, "medgemma_slots_busy") > 0 and time.monotonic() - left < 5:
        time.sleep(0.05)
    assert time.monotonic() - left < 1.0
    time.sleep(0.2)  # the audit line is written once the stream's task has ended
    entries = [json.loads(line) for line in served["audit"].read_text().splitlines()]
    mine = [e for e in entries if e["request_id"] == rid]
    assert len(mine) == 1 and mine[0]["error"] == "client_disconnected"


def test_audit_log_has_one_line_per_request_and_no_text(served: dict, client: openai.OpenAI, xray_png: Path) -> None:
    question = "Audit question about the film 4711"
    raw = client.chat.completions.with_raw_response.create(
        model="any", messages=[{"role": "system", "content": "Be brief."}, *image_message(question, data_url(xray_png, "image/png"))],
        max_tokens=5)
    answer = raw.parse().choices[0].message.content
    rid = raw.headers["x-request-id"]
    refused = requests.post(served["url"] + "/v1/chat/completions", json={"messages": []}, timeout=10)  # no key: 401
    text = served["audit"].read_text()
    entries = [json.loads(line) for line in text.splitlines()]  # every line whole JSON
    assert text.endswith("\n")
    mine = [e for e in entries if e["request_id"] == rid]
    assert len(mine) == 1
    e = mine[0]
    assert e["status"] == 200 and e["command"] == "serve" and e["tokens"]["generated"] == 5
    assert e["inputs_sha256"] == [hashlib.sha256(xray_png.read_bytes()).hexdigest()]  # as `run` hashes the file
    assert e["prompt_sha256"] == hashlib.sha256(f"Be brief.\x00{question}".encode()).hexdigest()
    assert not {"prompt", "answer", "system"} & set(e)
    assert question not in text and "Be brief" not in text and "base64" not in text
    assert len(answer) < 12 or answer not in text
    assert [x["status"] for x in entries if x["request_id"] == refused.headers["x-request-id"]] == [401]


def test_render_endpoint_equals_the_render_command(served: dict, dicom_file: Path, tmp_path: Path) -> None:
    r = requests.post(served["url"] + "/v1/render", headers=auth(), timeout=30,
                      json={"image_url": {"url": data_url(dicom_file, "application/dicom")}})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    out = tmp_path / "seen.png"
    from medgemma_edge.bundle import open_bundle

    size = open_bundle(served["bundle"]).config["vision"]["image_size"]
    res = run_cli("render", dicom_file, "-o", out, "--size", str(size))
    assert res.returncode == 0, res.stderr
    import io

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(Image.open(out)))


def test_beyond_loopback_without_a_key_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        res = run_cli("serve", "--bundle", tiny_bundle, "--host", host, "--port", "0", timeout=60)
        assert_one_line_error(res, f"--host {host}", "--api-key-file")
    short = tmp_path / "keys.txt"
    short.write_text("short\n")
    assert_one_line_error(run_cli("serve", "--bundle", tiny_bundle, "--api-key-file", short, timeout=60),
                          str(short), "16 characters")


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(served: dict) -> None:
    st = Path(sys.executable).with_name("schemathesis")
    res = subprocess.run([str(st), "run", served["url"] + "/openapi.json", "--checks", "all",
                          "--exclude-checks", "positive_data_acceptance", "--max-examples", "15",
                          "--request-timeout", "30", "--seed", "1", "-H", f"Authorization: Bearer {KEY}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failure" not in res.stdout.split("SUMMARY")[-1]
