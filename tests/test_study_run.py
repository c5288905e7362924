"""Studies end to end on the tiny bundle: the CLI on an 85-slice CT series, logits against transformers on
the CT notebook's own message list, a second question that encodes nothing, batched encoding, `bench
--study` with llama.cpp's own path on the same slices, `render --study`, `study-info`, and the refusals."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

import medgemma_edge
from convert.fidelity.metrics import parity
from helpers import assert_one_line_error, decoder_bound, encoder_extra, run_cli
from medgemma_edge.inputs.sample_series import write_series
from medgemma_edge.runtime.studies import StudySession, ask_turn, plan_volume
from medgemma_edge.runtime.study_prompt import NOTEBOOK_INSTRUCTION, user_turn
from medgemma_edge.runtime.template import render_conversation
from medgemma_edge.runtime.sampling import SamplingParams

TPI, SIZE = 16, 64  # the tiny model's tokens per image and encoder size
QUESTION = "Is there a hypodense liver lesion?"


@pytest.fixture(scope="module")
def ct85(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ct85") / "series"
    write_series(folder, 85, size=96, seed=5)
    return folder


def test_run_study_cli_on_85_slices(tiny_bundle: Path, ct85: Path) -> None:
    t0 = time.perf_counter()
    res = run_cli("run", "--bundle", tiny_bundle, "--study", ct85, "--max-new-tokens", "4", "--json", QUESTION)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["tokens"]["image"] == 85 * TPI and out["tokens"]["generated"] == 4
    study = out["study"]
    assert (study["slices_sampled"], study["modality"], study["order"]) == (85, "CT", "instance")
    assert out["stop_reason"] == "length" and "encoding images" not in res.stderr  # no progress bar off a terminal
    ttft = out["timings"]["time_to_first_token_ms"]
    print(f"run --study, 85 slices, tiny bundle: {wall:.1f} s wall, TTFT {ttft:.0f} ms")


def _notebook_inputs(reference, turn, images: list[Image.Image]):
    """The CT notebook's messages (data-URL JPEGs are already what `turn` decoded: pass the same pixels)."""
    content = [{"type": "text", "text": NOTEBOOK_INSTRUCTION}]
    for n, im in enumerate(images, 1):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        content += [{"type": "image", "image": url}, {"type": "text", "text": f"SLICE {n}"}]
    content.append({"type": "text", "text": turn.question})
    return reference.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True, return_tensors="pt")


@pytest.mark.parametrize("encoder", ["gguf:f32", "onnx:fp32"])
def test_study_logits_match_transformers(tiny_bundle: Path, reference, tmp_path: Path, encoder: str) -> None:
    write_series(tmp_path / "ct", 40, size=80, seed=2)
    turn = plan_volume(tmp_path / "ct", QUESTION, max_slices=3)
    images = turn.ready(SIZE)
    inputs = _notebook_inputs(reference, turn, images)
    with reference.torch.no_grad():
        ref_logits = reference.model(**inputs).logits[0].float().numpy()
    with medgemma_edge.load(tiny_bundle, encoder=encoder, decoder="gguf:f32", n_ctx=1024) as pipe:
        atoms = pipe.atoms(render_conversation([user_turn(turn.content)]), pipe.encode_images(images))
        ours = pipe.cache_for(None).eval(atoms, all_logits=True)
    assert ours.shape == ref_logits.shape
    m = parity(ref_logits, ours)
    max_kl, min_top1 = decoder_bound("gguf:f32")
    assert m["mean_kl"] < max_kl + encoder_extra(encoder) and m["top1"] >= min_top1, m


def test_second_question_on_a_study_encodes_nothing(tiny_bundle: Path, ct85: Path) -> None:
    turn = plan_volume(ct85, QUESTION, max_slices=20)
    # f32: after a rollback the last prompt token is evaluated alone, and Q4_K's kernels for one row and for a
    # batch round differently, which can flip a greedy token of this random-weight model
    with medgemma_edge.load(tiny_bundle, encoder="onnx:fp32", decoder="gguf:f32",
                            n_ctx=turn.n_ctx(TPI, 1024)) as pipe:
        session = StudySession(pipe, turn)
        first = session.ask(QUESTION, sampling=SamplingParams(max_new_tokens=4))
        assert pipe.encoder_calls == 20 and first.image_tokens == 20 * TPI
        follow = session.ask("And the spleen?", sampling=SamplingParams(max_new_tokens=4))
        assert pipe.encoder_calls == 20 and follow.reused_tokens > 20 * TPI
        again = ask_turn(pipe, turn, sampling=SamplingParams(max_new_tokens=4))  # a new question, same study
        assert pipe.encoder_calls == 20 and again.token_ids == first.token_ids
        session.reset()
        assert session.ask(QUESTION, sampling=SamplingParams(max_new_tokens=4)).token_ids == first.token_ids


def test_batched_encoding_equals_one_by_one(tiny_bundle: Path, ct85: Path, capsys: pytest.CaptureFixture) -> None:
    images = plan_volume(ct85, QUESTION, max_slices=7).ready(SIZE)
    with medgemma_edge.load(tiny_bundle, encoder="onnx:fp32", decoder="gguf:q4_k_m", encode_batch=1) as single:
        one = [s.embeddings for s in single.encode_images(images)]
    with medgemma_edge.load(tiny_bundle, encoder="onnx:fp32", decoder="gguf:q4_k_m", encode_batch=4) as batched:
        four = [s.embeddings for s in batched.encode_images(images)]
        batched.encode_batch = None  # the default from memory: the tiny encoder fits 8, but a CPU stops at 2
        assert batched._batch_size() == 2
        assert batched.encoder_calls == 7
        batched.image_cache = type(batched.image_cache)()  # empty: encode again, with the bar on
        batched.progress = True
        batched.encode_images(images)
    for a, b in zip(one, four):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert "encoding images" in capsys.readouterr().err
    with medgemma_edge.load(tiny_bundle, encoder="gguf:f32", decoder="gguf:q4_k_m") as mtmd:
        assert mtmd._batch_size() == 1  # mtmd takes one image per call
        mtmd_embs = [s.embeddings for s in mtmd.encode_images(images[:2])]
    assert all(e.shape == (TPI, one[0].shape[1]) for e in mtmd_embs)


def test_bench_study_against_llama_cpp_on_the_same_slices(tiny_bundle: Path, tmp_path: Path) -> None:
    from medgemma_edge.measure.bench import run_bench

    write_series(tmp_path / "ct", 30, size=64, seed=1)
    ours, theirs = "gguf:f32+gguf:f32", "llama.cpp:f32+f32"
    doc = run_bench(tiny_bundle, tmp_path / "out", combos=f"{ours},{theirs}", reps=1, warmup=0, new_tokens=4,
                    scaling=(1, 3, 5), progress=False, study=tmp_path / "ct", n_ctx=None, threads=2)
    assert not doc["errors"], doc["errors"]
    rows = {(r["combo"], r["n_images"]): r for r in doc["rows"]}
    for n in (1, 3, 5):
        a, b = rows[(ours, n)]["runs"][0], rows[(theirs, n)]["runs"][0]
        assert a["image_tokens"] == b["image_tokens"] == TPI * n
        assert a["prompt_tokens"] == b["prompt_tokens"]  # the same notebook prompt through mtmd's own tokenizer
        assert a["tokens"][:2] == b["tokens"][:2]  # and the same greedy answer from the same GGUFs and pixels
    slices = sorted((tmp_path / "out" / "inputs" / "slices-5").glob("SLICE_*.png"))
    assert len(slices) == 5
    assert set(doc["study"]["scaling"]) == {ours, theirs}
    assert doc["study"]["scaling"][ours]["slices"] == [1, 3, 5]
    assert [t["target"].split(" ")[0] for t in doc["targets"]] == ["16-slice", "peak", "per-slice"]
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "## Study scaling" in md and "## 5 slices per question" in md


def test_render_study_writes_what_the_model_sees(ct85: Path, tmp_path: Path) -> None:
    res = run_cli("render", "--study", ct85, "--max-slices", "6", "--size", str(SIZE), "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    expected = plan_volume(ct85, QUESTION, max_slices=6).ready(SIZE)
    files = sorted((tmp_path / "out").glob("SLICE_*.png"))
    assert [f.name for f in files] == [f"SLICE_{k:03d}.png" for k in range(1, 7)]
    for f, im in zip(files, expected):
        np.testing.assert_array_equal(np.asarray(Image.open(f)), np.asarray(im))
    rows = (tmp_path / "out" / "slices.tsv").read_text().splitlines()
    assert rows[1].split("\t")[0] == "SLICE 1" and len(rows) == 7
    picked = [int(r.split("\t")[4]) for r in rows[1:]]  # InstanceNumber of each slice shown
    assert picked == [int(round(i / 6 * 84)) + 1 for i in range(1, 7)]  # the notebook's sampling of 85


def test_study_info_lists_series_without_phi(tmp_path: Path) -> None:
    write_series(tmp_path / "s" / "a", 10, size=16)
    write_series(tmp_path / "s" / "b", 25, size=16, modality="MR", orientation=[0, 1, 0, 0, 0, -1])
    res = run_cli("study-info", tmp_path / "s")
    assert res.returncode == 0, res.stderr
    assert "CT" in res.stdout and "sagittal" in res.stdout and "*" in res.stdout
    rows = json.loads(run_cli("study-info", "--json", tmp_path / "s").stdout)
    assert [(r["modality"], r["slices"], r["default"]) for r in rows] == [("CT", 10, True), ("MR", 25, False)]
    ds = pydicom.dcmread(next((tmp_path / "s" / "a").iterdir()))
    for value in (str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), "SYNTHETIC", "PHANTOM", "20240102"):
        assert value not in res.stdout + json.dumps(rows)


def test_refusals_are_one_line(tiny_bundle: Path, ct85: Path, tmp_path: Path) -> None:
    paths = write_series(tmp_path / "mixed", 3, size=16)
    ds = pydicom.dcmread(paths[1])
    ds.Modality = "MR"
    ds.save_as(paths[1])
    b = ("--bundle", tiny_bundle)
    assert_one_line_error(run_cli("run", *b, "--study", tmp_path / "mixed", "q"), paths[1], "mixed modalities")
    rt = Path(pydicom.data.get_testdata_file("rtstruct.dcm"))
    assert_one_line_error(run_cli("run", *b, "--study", rt, "q"), rt, "RT structure set")
    assert_one_line_error(run_cli("run", *b, "--study", ct85, "--image", paths[0], "q"), "--study")
    assert_one_line_error(run_cli("run", *b, "--prior", paths[0], "q"), "--prior")
    assert_one_line_error(run_cli("run", *b, "--pan-and-scan", "q"), "--pan-and-scan")
    assert_one_line_error(run_cli("run", *b, "--windowing", "serving", "q"), "--windowing")
    assert_one_line_error(run_cli("run", *b, "--study", ct85, "--windowing", "typo", "q"), "windowing")
    line = assert_one_line_error(run_cli("study-info", tmp_path / "nothing-here"), "nothing-here")
    assert "not found" in line
    # a memory limit the weights fit but 85 slices do not: the refusal names the slice count that would fit
    from medgemma_edge.bundle import open_bundle
    from medgemma_edge.runtime import memory

    cfg = open_bundle(tiny_bundle).config
    turn = plan_volume(ct85, "q")
    fit = turn.fit(TPI, 256)
    bundle = open_bundle(tiny_bundle)
    weights = bundle.find("decoder", "gguf:q4_k_m").total_size + bundle.find("encoder", "gguf:f16").total_size
    need = lambda n: sum(memory.estimate(cfg, weights, fit.ctx(n), 512, 2, True,  # noqa: E731
                                         memory.kv_cells(cfg, fit.ctx(n), 512)).values())
    limit = need(30) + 512  # the KV cache grows in steps of 256 positions: a few more slices may fit
    expected = max(n for n in range(86) if need(n) <= limit)
    assert 30 <= expected < 85
    line = assert_one_line_error(run_cli("run", *b, "--study", ct85, "--decoder", "gguf:q4_k_m", "--encoder",
                                         "gguf:f16", "--memory-limit", f"{limit / 2**30:.12f}", "q"),
                                 f"--max-slices {expected} would fit")
    assert "85 slices" in line


def test_chat_on_a_study_and_priors_with_dates_only_on_request(tiny_bundle: Path, ct85: Path, tmp_path: Path) -> None:
    res = run_cli("chat", "--bundle", tiny_bundle, "--study", ct85, "--max-slices", "8", "--max-new-tokens", "3",
                  input="Is there a lesion?\nAnd the spleen?\n")
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 2, res.stderr
    prior = write_series(tmp_path / "prior", 1, size=32, study_date="20190301")[0]
    current = write_series(tmp_path / "current", 1, size=32, study_date="20240102")[0]
    for extra in ([], ["--dicom-context"]):
        log = tmp_path / f"audit{len(extra)}.jsonl"
        res = run_cli("run", "--bundle", tiny_bundle, "--image", current, "--prior", prior, "--max-new-tokens", "2",
                      "--audit-log", log, "--audit-include-text", *extra, "Compare")
        assert res.returncode == 0, res.stderr
        entry = json.loads(log.read_text())
        assert entry["tokens"]["image"] == 2 * TPI and len(entry["inputs_sha256"]) == 2
        assert ("2019-03-01" in entry["prompt"] and "Image 1 (prior)" in entry["prompt"]) == bool(extra)
    assert_one_line_error(run_cli("run", "--bundle", tiny_bundle, "--image", prior, "--prior", current, "q"),
                          current, "swap")
