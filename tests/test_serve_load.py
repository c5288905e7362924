"""16 concurrent clients, each sending several requests with an image, against a server with 2 slots and a
short queue: every request is answered or refused with 429 (Retry-After), no answer reaches the wrong client
(each asks for a seeded answer, computed beforehand as `run` computes it), and the server's RSS stays flat.

The decoder is onnx:int8 (one ONNX Runtime session shared by both slots): there, as with gguf:f32, a prompt
prefilled in two parts (a slot reusing part of its cache) gives bit-identical logits to one fresh prefill, so a
seeded answer is a fingerprint. llama.cpp's quantized CPU kernels depend on the batch split (q4_k_m moved the
tiny model's logits by up to 0.36), which a hot sampler turns into another answer. Every request asks something
new, so no prefill is a lone re-evaluated token."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import numpy as np
import openai
import pytest
from helpers import ServeProcess, run_cli
from PIL import Image

import medgemma_edge
from medgemma_edge import SamplingParams

N_CLIENTS = 16
ROUNDS = 3  # each client sends one request per round
DECODER = "onnx:int8"
TOKENS = 5
ATTEMPTS = 3  # a refused request is tried again after Retry-After, at most this often
TEMPERATURE = 2.0  # random tiny weights repeat one token; this hot, each seed gives its own answer


def question(k: int, r: int) -> str:
    return f"Client {k}, round {r}: what do you see?"


def seed(k: int, r: int) -> int:
    return 1000 + N_CLIENTS * r + k


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = []
    for i in range(4):
        path = tmp_path_factory.mktemp("load") / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def expected(tiny_bundle: Path, images: list[Path]) -> dict[tuple[int, int], str]:
    """Each request's seeded answer, from the library as `run` calls it (two of them checked against `run`)."""
    def sampling(k: int, r: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=TOKENS, temperature=TEMPERATURE, seed=seed(k, r))

    with medgemma_edge.load(tiny_bundle, decoder=DECODER) as pipe:
        answers = {(k, r): medgemma_edge.generate(pipe, question(k, r), images=[images[k % 4]], sampling=sampling(k, r)).text
                   for k in range(N_CLIENTS) for r in range(ROUNDS)}
    for k, r in ((0, 0), (5, 2)):
        res = run_cli("run", "--bundle", tiny_bundle, "--decoder", DECODER, "--image", images[k % 4], "--temperature",
                      str(TEMPERATURE), "--seed", str(seed(k, r)), "--max-new-tokens", str(TOKENS), "--json", question(k, r))
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["text"] == answers[k, r]
    for r in range(ROUNDS):  # mostly distinct among the requests in flight together: a swap shows
        assert len({answers[k, r] for k in range(N_CLIENTS)}) >= 12
    return answers


def test_sixteen_clients_every_request_answered_or_refused_none_mixed_rss_flat(
        tiny_bundle: Path, images: list[Path], expected: dict[tuple[int, int], str]) -> None:
    server = ServeProcess("--bundle", tiny_bundle, "--decoder", DECODER, "--parallel", "2", "--max-queue", "6")
    urls = [f"data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" for p in images]
    outcomes: list[tuple[int, str, str]] = []  # (client, outcome, detail)
    refusals: list[str] = []  # the Retry-After of every 429
    lock = threading.Lock()

    def client(k: int, r: int) -> None:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": [{"type": "text", "text": question(k, r)},
                                                 {"type": "image_url", "image_url": {"url": urls[k % 4]}}]}]
        for attempt in range(ATTEMPTS):
            try:
                done = c.chat.completions.create(model="m", messages=messages, max_tokens=TOKENS,
                                                 temperature=TEMPERATURE, seed=seed(k, r))
            except openai.RateLimitError as exc:
                with lock:
                    refusals.append(exc.response.headers.get("retry-after", ""))
                if attempt + 1 == ATTEMPTS:
                    with lock:
                        outcomes.append((k, "refused", exc.code or ""))
                else:
                    threading.Event().wait(min(2.0, float(exc.response.headers.get("retry-after", "1"))))
                continue
            except Exception as exc:  # noqa: BLE001 - any other outcome is a failure, recorded
                with lock:
                    outcomes.append((k, "error", f"{type(exc).__name__}: {exc}"))
                break
            text = done.choices[0].message.content
            with lock:
                outcomes.append((k, "answered" if text == expected[k, r] else "WRONG", text))
            break

    rss = []
    try:
        for r in range(ROUNDS):
            threads = [threading.Thread(target=client, args=(k, r)) for k in range(N_CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert not any(t.is_alive() for t in threads), "a client hung"
            rss.append(server.rss_bytes())
    finally:
        code = server.stop()
    assert code == 0 and "Traceback" not in server.stderr, server.stderr
    kinds = [o for _, o, _ in outcomes]
    assert len(outcomes) == N_CLIENTS * ROUNDS  # nothing lost
    assert not [o for o in outcomes if o[1] in ("WRONG", "error")], [o for o in outcomes if o[1] in ("WRONG", "error")]
    assert kinds.count("answered") >= N_CLIENTS * ROUNDS // 2
    assert refusals and all(r.isdigit() and int(r) >= 1 for r in refusals)  # the queue bound was reached
    # flat after the first round (which warms allocators and caches): within 24 MiB or 5%
    growth = rss[-1] - rss[1]
    assert growth < max(24 << 20, rss[1] // 20), [r >> 20 for r in rss]
    print(f"load: {kinds.count('answered')} answered, {kinds.count('refused')} refused after {ATTEMPTS} tries, "
          f"{len(refusals)} 429s, RSS MiB per round {[r >> 20 for r in rss]}")
