"""Text-only Gemma 3 (`Gemma3ForCausalLM`, as MedGemma 27B text-it): convert, info, run, chat, bench, validate.

Real components throughout: `synth --size tiny-text` writes the flat checkpoint, the CLI converts it, and
transformers' Gemma3ForCausalLM is the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_no_partials, assert_one_line_error, decoder_bound, linked_copy, run_cli

import medgemma_edge
from convert.fidelity.metrics import decisive_top1, parity, top2_margin
from medgemma_edge import SamplingParams, UserError
from medgemma_edge.bundle import MANIFEST, open_bundle
from medgemma_edge.extras import synthesize
from medgemma_edge.measure.bench import run_bench

PROMPT, SYSTEM = "List three common causes of a pleural effusion.", "You are an expert radiologist."


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("text") / "ckpt", size="tiny-text", seed=1, progress=False)


@pytest.fixture(scope="module")
def converted(text_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """Converted as a user would: the CLI, default --mmproj (not given), GGUF and ONNX decoders."""
    out = tmp_path_factory.mktemp("text-bundle") / "bundle"
    res = run_cli("convert", text_ckpt, "-o", out, "--gguf", "f32,q8_0", "--onnx-decoder", "fp32")
    assert res.returncode == 0, res.stderr
    return out, res


@pytest.fixture(scope="module")
def text_bundle(converted: tuple[Path, object]) -> Path:
    return converted[0]


@pytest.fixture(scope="module")
def reference(text_ckpt: Path):
    from convert.fidelity.reference import Reference

    return Reference(text_ckpt)


def test_checkpoint_is_the_flat_causal_lm_layout(text_ckpt: Path) -> None:
    cfg = json.loads((text_ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    assert "text_config" not in cfg and "vision_config" not in cfg
    header = json.loads((text_ckpt / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (text_ckpt / "model.safetensors").read_bytes()[:8], "little")])
    names = {n for n in header if n != "__metadata__"}
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight"} <= names
    assert not any(n.startswith(("vision_tower", "multi_modal_projector", "language_model")) for n in names)
    assert not (text_ckpt / "preprocessor_config.json").exists()


def test_convert_skips_the_default_encoder_in_one_line(converted: tuple[Path, object]) -> None:
    out, res = converted
    said = [line for line in res.stderr.splitlines() if "text-only" in line]
    assert len(said) == 1 and "--mmproj f16" in said[0] and "skipped" in said[0], res.stderr
    bundle = open_bundle(out)
    assert not bundle.has_vision
    cfg = bundle.config
    assert cfg["architecture"] == "Gemma3ForCausalLM"
    assert "vision" not in cfg and "tokens_per_image" not in cfg and "image_token_id" not in cfg
    assert {(a.kind, a.id) for a in bundle.artifacts} == {("decoder", "gguf:f32"), ("decoder", "gguf:q8_0"),
                                                         ("decoder", "onnx:fp32")}
    info = run_cli("info", out)
    assert info.returncode == 0 and "vision     none" in info.stdout, info.stdout + info.stderr


@pytest.mark.parametrize("flag,value", [("--mmproj", "f16"), ("--onnx-vision", "int8")])
def test_an_explicit_encoder_is_refused_naming_the_checkpoint(text_ckpt: Path, tmp_path: Path, flag: str,
                                                              value: str) -> None:
    out = tmp_path / "refused"
    line = assert_one_line_error(run_cli("convert", text_ckpt, "-o", out, "--gguf", "q8_0", flag, value),
                                 text_ckpt, flag)
    assert "text-only" in line
    assert not out.exists()
    assert_no_partials(out)


@pytest.mark.parametrize("decoder", ["gguf:f32", "onnx:fp32", "gguf:q8_0"])
def test_logits_match_transformers_causal_lm(text_bundle: Path, reference, decoder: str) -> None:
    ref_ids, ref_logits = reference.prompt_logits(PROMPT, [], SYSTEM)
    pipe = medgemma_edge.load(text_bundle, decoder=decoder)
    assert pipe.encoder is None
    ids, logits = pipe.prompt_logits(PROMPT, [], SYSTEM)
    pipe.close()
    assert ids.tolist() == ref_ids.tolist()
    m = parity(ref_logits, logits)
    max_kl, min_top1 = decoder_bound(decoder)
    assert m["mean_kl"] < max_kl and m["top1"] >= min_top1, m
    if decoder.endswith("32"):
        share, agree = decisive_top1(ref_logits, logits)
        assert share >= 0.9 and agree, (share, agree)


def test_greedy_matches_transformers(text_bundle: Path, reference) -> None:
    n = 12
    ref_tokens, ref_step_logits = reference.greedy(PROMPT, [], n, SYSTEM)
    pipe = medgemma_edge.load(text_bundle, decoder="gguf:f32")
    ours = medgemma_edge.generate(pipe, PROMPT, system=SYSTEM, sampling=SamplingParams(max_new_tokens=n))
    _, ref_logits = reference.prompt_logits(PROMPT, [], SYSTEM)
    error = parity(ref_logits, pipe.prompt_logits(PROMPT, [], SYSTEM)[1])["max_abs"]
    pipe.close()
    assert top2_margin(ref_step_logits).min() > 2 * error  # no step a near-tie within our error
    assert ours.token_ids == [t for t in ref_tokens if t not in (1, 106)] and len(ours.token_ids) == n


def test_run_answers_and_refuses_images_in_one_line(text_bundle: Path, xray_png: Path) -> None:
    ok = run_cli("run", "--bundle", text_bundle, "--max-new-tokens", "4", "--json", PROMPT)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["encoder"] is None and result["tokens"]["generated"] == 4 and result["tokens"]["image"] == 0
    line = assert_one_line_error(run_cli("run", "--bundle", text_bundle, "--image", xray_png, PROMPT), text_bundle)
    assert "no vision part" in line
    line = assert_one_line_error(run_cli("run", "--bundle", text_bundle, "--encoder", "gguf:f16", PROMPT), text_bundle)
    assert "no vision part" in line


def test_chat_answers_and_refuses_an_attached_image(text_bundle: Path, xray_png: Path) -> None:
    res = run_cli("chat", "--bundle", text_bundle, "--max-new-tokens", "3", input=f"{PROMPT}\n/image {xray_png}\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()  # the question was answered
    notes = [line for line in res.stderr.splitlines() if "no vision part" in line]
    assert len(notes) == 1 and str(text_bundle) in notes[0], res.stderr
    assert_one_line_error(run_cli("chat", "--bundle", text_bundle, "--image", xray_png, input=""), text_bundle)


def test_python_api_loads_without_an_encoder_and_refuses_images(text_bundle: Path, xray_png: Path) -> None:
    pipe = medgemma_edge.load(text_bundle)  # the default text_only=False: a text-only bundle has no encoder anyway
    try:
        assert pipe.encoder is None and pipe.info["decoder"] == "gguf:q8_0"
        with pytest.raises(UserError, match="no vision part"):
            medgemma_edge.generate(pipe, PROMPT, [xray_png])
    finally:
        pipe.close()


def test_bench_measures_every_decoder_and_transformers(text_bundle: Path, text_ckpt: Path, tmp_path: Path,
                                                        xray_png: Path) -> None:
    doc = run_bench(text_bundle, tmp_path / "bench", reps=1, warmup=0, new_tokens=3, reference=text_ckpt,
                    reference_tokens=2, progress=False)
    assert not doc["errors"], doc["errors"]
    rows = {r["combo"]: r for r in doc["rows"]}
    assert set(rows) == {"gguf:q8_0", "gguf:f32", "onnx:fp32", "transformers:fp32"}
    for combo, row in rows.items():
        run = row["runs"][0]
        assert row["n_images"] == 0 and run["image_tokens"] == 0, combo
        assert run["decode_tokens_per_s"] > 0 and run["ttft_ms"] > 0, combo
    prompts = {r["runs"][0]["prompt_tokens"] for r in rows.values()}
    assert len(prompts) == 1  # transformers and every backend saw the same templated question
    assert "## Text-only questions" in (tmp_path / "bench" / "bench.md").read_text()
    assert_one_line_error(run_cli("bench", "--bundle", text_bundle, "--image", xray_png, "--out", tmp_path / "b2"),
                          text_bundle, "--image")
    assert_one_line_error(run_cli("bench", "--bundle", text_bundle, "--combos", "gguf:f32+gguf:f32",
                                  "--out", tmp_path / "b3"), "text-only")


def test_validate_reports_text_figures_only(text_bundle: Path, text_ckpt: Path, tmp_path: Path,
                                            xray_png: Path) -> None:
    bundle = linked_copy(text_bundle, tmp_path / "bundle")
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\nSummarize the treatment of community-acquired pneumonia.\n")
    res = run_cli("validate", "--bundle", bundle, "--reference", text_ckpt, "--prompts", tmp_path / "prompts.txt",
                  "--max-new-tokens", "3", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["passed"] and report["reference"]["model"].startswith("transformers Gemma3ForCausalLM")
    assert [c["image"] for c in report["inputs"]["cases"]] == [None, None]
    rows = {r["artifact"]: r for r in report["artifacts"]}
    assert set(rows) == {"gguf:f32", "gguf:q8_0", "onnx:fp32"}
    for r in rows.values():
        assert r["kind"] == "decoder" and r["image"] is None and r["partner"] is None
        assert r["text"]["decisive_top1"] == 1.0 and 0 < r["text"]["decisive_share"] <= 1
    assert rows["gguf:f32"]["text"]["decisive_share"] >= 0.9
    md = next((bundle / "validation").iterdir()) / "report.md"
    assert "text decisive" in md.read_text()
    assert json.loads((bundle / MANIFEST).read_text())["reports"][0]["passed"]
    images = tmp_path / "images"
    images.mkdir()
    (images / "cxr.png").write_bytes(xray_png.read_bytes())
    assert_one_line_error(run_cli("validate", "--bundle", bundle, "--reference", text_ckpt, "--images", images),
                          "text-only", "--images")
