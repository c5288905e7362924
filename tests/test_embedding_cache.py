"""The persistent embedding cache behind the pipeline (real encoders and decoders, the tiny bundle), and several
processes sharing one cache folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from helpers import run_cli

import medgemma_edge
from medgemma_edge import SamplingParams

ENCODER, DECODER, OTHER = "onnx:fp32", "gguf:q8_0", "gguf:f32"
ASK = dict(sampling=SamplingParams(max_new_tokens=6))


def _answer(bundle: Path, cache: Path, decoder: str, image: Path, encoder: str = ENCODER):
    with medgemma_edge.load(bundle, encoder=encoder, decoder=decoder, cache_dir=cache) as pipe:
        result = medgemma_edge.generate(pipe, "Describe this image.", [image], **ASK)
        span = pipe.encode_images([image])[0]
        return result, pipe.encoder_calls, pipe.store.stats(), np.array(span.embeddings)


def test_a_second_process_and_another_decoder_encode_nothing(tiny_bundle: Path, xray_png: Path,
                                                              tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, calls, stats, emb = _answer(tiny_bundle, cache, DECODER, xray_png)
    assert calls == 1 and stats["writes"] == 1
    again, calls, stats, emb2 = _answer(tiny_bundle, cache, DECODER, xray_png)  # a fresh pipeline: empty memory
    assert calls == 0 and stats["hits"] >= 1
    assert np.array_equal(emb, emb2) and again.token_ids == first.token_ids
    other, calls, _, emb3 = _answer(tiny_bundle, cache, OTHER, xray_png)  # the cohort re-run with another decoder
    assert calls == 0 and np.array_equal(emb, emb3)
    _, calls, _, _ = _answer(tiny_bundle, cache, DECODER, xray_png, encoder="gguf:f16")  # another encoder: its own
    assert calls == 1


def test_a_corrupt_entry_is_recomputed_with_the_same_answer(tiny_bundle: Path, xray_png: Path,
                                                             tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, _, _, emb = _answer(tiny_bundle, cache, DECODER, xray_png)
    (entry,) = (cache / "v1").glob("*/*.emb")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one payload byte: the embeddings would be wrong, so the entry must not be used
    entry.write_bytes(bytes(data))
    again, calls, stats, emb2 = _answer(tiny_bundle, cache, DECODER, xray_png)
    assert calls == 1 and stats["corrupt"] == 1
    assert np.array_equal(emb, emb2) and again.token_ids == first.token_ids


def test_run_takes_cache_dir(tiny_bundle: Path, xray_png: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ["run", "--bundle", tiny_bundle, "--encoder", ENCODER, "--decoder", DECODER, "--image", xray_png,
            "--max-new-tokens", "4", "--json", "--cache-dir", cache, "--cache-size", "0.5", "Describe"]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert len(list((cache / "v1").glob("*/*.emb"))) == 1
    res2 = run_cli(*args)
    assert res2.returncode == 0, res2.stderr
    assert json.loads(res2.stdout)["text"] == json.loads(res.stdout)["text"]
    bad = tmp_path / "not-a-folder"
    bad.write_text("x")
    res3 = run_cli(*args[:-5], "--cache-dir", bad, "Describe")
    assert res3.returncode != 0 and "not a folder" in res3.stderr and "Traceback" not in res3.stderr


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from medgemma_edge.runtime.embedding_store import EmbeddingStore

    folder, seed, bound = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = EmbeddingStore(folder, max_bytes=bound)
    rng = np.random.default_rng(seed)
    for step in range(150):
        k = int(rng.integers(0, 12))  # twelve keys shared by every process
        expected = np.full((64, 64), k, np.float32)
        got = store.get(f"key{k}")
        if got is not None and not np.array_equal(got, expected):
            sys.exit(f"wrong embeddings for key{k}")
        if got is None:
            store.put(f"key{k}", expected)
    print(store.corrupt)
""")


def test_several_processes_share_one_cache_folder(tmp_path: Path) -> None:
    """Writers, readers and eviction at once (a bound of ~6 entries for 12 keys): every read is whole or a miss."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    bound = 6 * (64 * 64 * 4 + 300)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "c"), str(seed), str(bound)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip() == "0", (out, err)  # no process ever read a torn or foreign entry
    left = list((tmp_path / "c" / "v1").glob("*/*.emb"))
    assert 0 < len(left) <= 6 + 2  # within the bound, but for entries other processes were writing meanwhile
    assert not list((tmp_path / "c" / "v1").glob("*/.*partial*"))
