"""The datasets package's pure parts: statistics checked against hand computations, the letter-extraction rule,
manifest parsing with line numbers, the results file (torn last line, lock, retry) and the resume key."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from medgemma_edge import SamplingParams, UserError
from medgemma_edge.datasets.eval import reference_label, summarise
from medgemma_edge.datasets.items import Item, read_items
from medgemma_edge.datasets.jobs import Job, Target
from medgemma_edge.datasets.results import ResultLog
from medgemma_edge.datasets.scoring import extract_letter, log_softmax, mc_prompt, normalise, normalised_match
from medgemma_edge.datasets.stats import exact_binomial_two_sided, mcnemar, wilson

pytestmark = pytest.mark.unit

OPTIONS = (("A", "four"), ("B", "two"), ("C", "six"), ("D", "ten"))


# -- statistics, by hand ----------------------------------------------------------------------------------
def test_wilson_interval_equals_the_hand_computation() -> None:
    # 21 of 24, z = 1.96: p = 0.875, z^2 = 3.8416, denom = 1 + 3.8416/24 = 1.160067,
    # centre = (0.875 + 3.8416/48) / 1.160067 = 0.955033 / 1.160067 = 0.823258,
    # half = 1.96 / 1.160067 * sqrt(0.875 * 0.125 / 24 + 3.8416 / 2304) = 1.689557 * sqrt(0.0045573 + 0.0016674)
    #      = 1.689557 * 0.078897 = 0.133301
    w = wilson(21, 24, z=1.96)
    assert w.p == 0.875
    assert w.low == pytest.approx(0.823258 - 0.133301, abs=3e-6)  # 0.689957
    assert w.high == pytest.approx(0.823258 + 0.133301, abs=3e-6)  # 0.956559
    # 0 of 10: the interval is [0, z^2/(n + z^2)] = [0, 3.8416/13.8416]
    zero = wilson(0, 10, z=1.96)
    assert zero.low == 0.0 and zero.high == pytest.approx(3.8416 / 13.8416, abs=1e-12)
    full = wilson(10, 10, z=1.96)
    assert full.high == 1.0 and full.low == pytest.approx(10 / 13.8416, abs=1e-12)
    assert math.isnan(wilson(0, 0).low)
    with pytest.raises(ValueError):
        wilson(5, 4)


def test_mcnemar_exact_p_values_by_hand() -> None:
    # b = 16, c = 0: 2 * P[X <= 0] = 2 / 2^16
    ref = [True] * 16 + [True] * 5 + [False] * 3
    other = [False] * 16 + [True] * 5 + [False] * 3
    t = mcnemar(ref, other)
    assert (t.b, t.c, t.discordant) == (16, 0, 16)
    assert t.p_value == pytest.approx(2 / 2 ** 16, rel=1e-12)
    # b = 5, c = 2: 2 * (C(7,0) + C(7,1) + C(7,2)) / 2^7 = 2 * 29 / 128
    t = mcnemar([True] * 5 + [False] * 2, [False] * 5 + [True] * 2)
    assert (t.b, t.c) == (5, 2) and t.p_value == pytest.approx(58 / 128, rel=1e-12)
    # equal discordance, or none: no evidence at all
    assert mcnemar([True, False], [False, True]).p_value == 1.0
    assert mcnemar([True, True], [True, True]).p_value == 1.0
    assert exact_binomial_two_sided(3, 3000) < 1e-300 or exact_binomial_two_sided(3, 3000) == 0.0  # no overflow


def test_summarise_counts_errors_apart_and_pairs_on_common_items() -> None:
    ids = ["q1", "q2", "q3", "q4"]
    good = {i: {"status": "ok", "correct_loglik": True, "pred_loglik": "A"} for i in ids}
    bad = {"q1": {"status": "ok", "correct_loglik": False, "pred_loglik": "B"},
           "q2": {"status": "ok", "correct_loglik": False, "pred_loglik": "B"},
           "q3": {"status": "ok", "correct_loglik": True, "pred_loglik": "A"},
           "q4": {"status": "error", "error": "x"}}
    report = summarise({"ref": good, "bad": bad}, ids, "ref")
    rows = {r["artifact"]: r for r in report["artifacts"]}
    assert rows["ref"]["methods"]["loglik"] == {"correct": 4, "n": 4, "accuracy": 1.0,
                                                "ci95": [wilson(4, 4).low, wilson(4, 4).high]}
    assert rows["bad"]["errors"] == 1 and rows["bad"]["methods"]["loglik"]["n"] == 3
    (pair,) = report["paired"]
    assert (pair["n"], pair["b_reference_only"], pair["c_other_only"]) == (3, 2, 0)
    assert pair["p_value"] == pytest.approx(0.5) and not pair["differs"]
    assert pair["same_prediction"] == pytest.approx(1 / 3)


def test_the_most_faithful_artifact_is_the_reference() -> None:
    targets = [Target(bundle="b", decoder="gguf:q4_k_m"), Target(bundle="b", decoder="gguf:q8_0"),
               Target(bundle="b", decoder="onnx:int4")]
    assert reference_label(targets) == "gguf:q8_0"
    assert reference_label(targets, "onnx:int4") == "onnx:int4"
    with pytest.raises(UserError, match="gguf:f32"):
        reference_label(targets, "gguf:f32")
    assert reference_label([Target(decoder_gguf="/x/a.gguf"), Target(decoder_gguf="/x/b.gguf")]) == "a.gguf"


# -- scoring ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("(C)", "C"), ("D. ten", "D"), ("**A**", "A"), ("The answer is C.", "C"), ("Answer: (B)", "B"),
    ("I think the answer is D because", "D"), ("Final answer: A", "A"), ("B because two chambers", "B"),
    ("A four-chambered heart", "A"), ("It has six chambers", "C"), ("A pneumothorax", None), ("I do not know", None),
    ("the answer is a", None), ("two or four", None), ("The answer is A, not B. Final answer: C", "C"),
    ("E", None), ("", None),
])
def test_letter_extraction_rule(text: str, letter: str | None) -> None:
    assert extract_letter(text, "ABCD", OPTIONS) == letter


def test_normalised_match_and_prompts() -> None:
    assert normalise("  The Heart, has FOUR chambers! ") == "heart has four chambers"
    assert normalised_match("A pneumothorax.", "pneumothorax") and not normalised_match("effusion", "pneumothorax")
    assert mc_prompt("Q?", OPTIONS).endswith("A. four\nB. two\nC. six\nD. ten\n\nAnswer with the letter of the "
                                             "correct option.")
    assert mc_prompt("Q?", OPTIONS, raw=True) == "Question: Q?\nA. four\nB. two\nC. six\nD. ten\nAnswer:"
    import numpy as np

    rows = np.array([[0.0, math.log(3.0)]], dtype=np.float32)  # softmax: 1/4, 3/4
    assert np.allclose(log_softmax(rows), [[math.log(0.25), math.log(0.75)]], atol=1e-7)


# -- items ------------------------------------------------------------------------------------------------
def test_jsonl_manifest_bad_rows_are_named_by_line(tmp_path: Path) -> None:
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join([
        json.dumps({"id": "a", "images": ["x.png"], "question": "q"}),
        "",
        "{not json",
        json.dumps({"id": "a", "question": "dup"}),
        json.dumps({"question": "no id"}),
        json.dumps({"id": "b", "options": ["x", "y"], "answer": "C"}),
        json.dumps({"id": "c", "options": {"A": "x", "C": "y"}}),
        json.dumps(["a list"]),
    ]) + "\n")
    with pytest.raises(UserError) as err:
        read_items(m)
    msg = str(err.value)
    assert "\n" not in msg and "6 bad row(s) (lines 3, 4, 5, 6, 7, 8)" in msg
    for line in (3, 4, 5, 6, 7):  # the first five with their reason, every line number in the list
        assert f"line {line}:" in msg, msg
    assert "also on line 1" in msg and "not one of the option letters" in msg


def test_manifests_resolve_paths_and_read_options(tmp_path: Path) -> None:
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": 7, "images": "sub/x.png", "question": "q", "options": ["four", "two"],
                             "answer": "a"}) + "\n")
    (item,) = read_items(m)
    assert item == Item("7", (str(tmp_path / "sub" / "x.png"),), None, "q", "A", (("A", "four"), ("B", "two")), 1)
    assert Item.from_row(json.loads(json.dumps(item.to_row()))) == item
    c = tmp_path / "m.csv"
    c.write_text('id,images,question,options,answer\nr1,a.png|/abs/b.png,"two\nlines","[""x"",""y""]",B\n\n'
                 'r2,,q,x|y|z,\nr3,,q,,,extra\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 6: 6 cells"):
        read_items(c)
    c.write_text('id,images,question,options,answer\nr1,a.png|/abs/b.png,"two\nlines","[""x"",""y""]",B\n\n'
                 'r2,,q,x|y|z,\n')
    r1, r2 = read_items(c)
    assert r1.images == (str(tmp_path / "a.png"), "/abs/b.png") and r1.question == "two\nlines" and r1.answer == "B"
    assert r2.options == (("A", "x"), ("B", "y"), ("C", "z")) and r2.line == 5
    with pytest.raises(UserError, match="no `id` column"):
        (tmp_path / "n.csv").write_text("name,question\nx,y\n")
        read_items(tmp_path / "n.csv")


def test_folder_items_and_refusals(tmp_path: Path) -> None:
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "a.dcm").write_bytes(b"x")  # DICOM by its suffix (its content is checked when it runs)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "study1").mkdir()
    (tmp_path / ".hidden").mkdir()
    items = read_items(tmp_path)
    assert [(i.id, bool(i.study)) for i in items] == [("a.dcm", False), ("b.png", False), ("study1", True)]
    with pytest.raises(UserError, match="input not found"):
        read_items(tmp_path / "missing")
    with pytest.raises(UserError, match=".jsonl or .csv"):
        read_items(tmp_path / "notes.txt")


# -- the results file -------------------------------------------------------------------------------------
def test_results_file_repairs_a_torn_line_refuses_a_second_writer_and_retries_errors(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    with ResultLog(out) as log:
        log.append({"key": "k1", "status": "ok", "answer": "é"})
        log.append({"key": "k2", "status": "error", "error": "bad"})
        with pytest.raises(UserError, match="another run is writing"):
            ResultLog(out)
    whole = out.read_bytes()
    with out.open("ab") as f:
        f.write(b'{"key": "k3", "status": "o')  # what a writer killed inside its write leaves
    with ResultLog(out) as log:
        assert log.repaired == len(b'{"key": "k3", "status": "o') and out.read_bytes() == whole
        assert log.done == {"k1": "ok", "k2": "error"}
        assert log.drop_errors(["k1", "k2"]) == 1 and log.done == {"k1": "ok"}
        log.append({"key": "k2", "status": "ok"})
    assert [json.loads(x)["key"] for x in out.read_text().splitlines()] == ["k1", "k2"]
    out.write_text(out.read_text() + "garbage\n" + json.dumps({"key": "k9"}) + "\n")
    with pytest.raises(UserError, match="line 3 is not a JSON object"):
        ResultLog(out)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        ResultLog(fifo)


# -- the resume key ---------------------------------------------------------------------------------------
def test_resume_key_covers_inputs_model_and_parameters_only() -> None:
    model = {"bundle_id": "b" * 64, "decoder": "gguf:q8_0", "decoder_sha256": "d" * 64, "encoder": None,
             "encoder_sha256": None}
    job = Job("answer", Target(bundle="x"), model, prompt="Describe")
    item = Item("i1", ("/x.png",))
    key = job.key(item, ["a" * 64])
    assert key == Job("answer", Target(bundle="y", n_threads=3, cache_dir="/c"), model, prompt="Describe").key(
        item, ["a" * 64])  # where the bundle lives, threads and the cache do not change the answer
    different = [
        job.key(item, ["f" * 64]),
        job.key(Item("i2", ("/x.png",)), ["a" * 64]),
        Job("answer", job.target, {**model, "decoder_sha256": "e" * 64}, prompt="Describe").key(item, ["a" * 64]),
        Job("answer", job.target, model, prompt="Describe", sampling=SamplingParams(seed=1)).key(item, ["a" * 64]),
        Job("answer", job.target, model, prompt="Other").key(item, ["a" * 64]),
        Job("answer", job.target, model, prompt="Describe", system="S").key(item, ["a" * 64]),
        Job("score", job.target, model, prompt="Describe").key(item, ["a" * 64]),
    ]
    assert len({key, *different}) == len(different) + 1
    with pytest.raises(UserError, match="no question"):
        Job("answer", job.target, model).question(item)


def test_a_non_finite_number_becomes_null_rather_than_failing_the_run(tmp_path: Path) -> None:
    with ResultLog(tmp_path / "r.jsonl") as log:
        log.append({"key": "k", "status": "ok", "timings": {"x": float("nan")}, "v": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "r.jsonl").read_text()) == {"key": "k", "status": "ok", "timings": {"x": None},
                                                              "v": [None, 1.5]}
