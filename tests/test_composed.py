"""Any encoder with any decoder: every combination of the bundle's ONNX and GGUF artifacts, composed
only through embeddings, against transformers' fp32 forward on the same prompt and image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import medgemma_edge
from medgemma_edge import SamplingParams
from helpers import DECODERS, ENCODERS, decoder_bound, encoder_extra
from convert.fidelity.metrics import decisive_top1, parity, top2_margin

CLI = str(Path(sys.executable).with_name("medgemma-edge"))
PROMPT, SYSTEM = "Describe this X-ray", "You are an expert radiologist."


@pytest.fixture(scope="module")
def ref_image(reference, xray_png):
    return reference.prompt_logits(PROMPT, [xray_png], SYSTEM)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("decoder", DECODERS)
def test_every_encoder_with_every_decoder(tiny_bundle: Path, ref_image, xray_png: Path, decoder: str,
                                          encoder: str) -> None:
    ref_ids, ref_logits = ref_image
    with medgemma_edge.load(tiny_bundle, encoder=encoder, decoder=decoder, verify=False) as pipe:  # hashing: test_cli_errors
        ids, logits = pipe.prompt_logits(PROMPT, [xray_png], SYSTEM)
    assert ids.tolist() == ref_ids.tolist()
    m = parity(ref_logits, logits)
    max_kl, min_top1 = decoder_bound(decoder)
    assert m["mean_kl"] < max_kl + encoder_extra(encoder) and m["top1"] >= min_top1 - 0.05, m


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("decoder", DECODERS)
def test_every_combination_runs_from_the_cli(tiny_bundle: Path, xray_png: Path, decoder: str, encoder: str) -> None:
    out = subprocess.run([CLI, "run", "--bundle", str(tiny_bundle), "--image", str(xray_png), "--encoder", encoder,
                          "--decoder", decoder, "--max-new-tokens", "3", "--threads", "2", "--no-verify", "--json", PROMPT],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["encoder"], result["decoder"]) == (encoder, decoder)
    assert result["tokens"]["image"] == 16 and result["threads"] == 2
    backends = result["providers"]
    assert backends["decoder"] == (["CPUExecutionProvider"] if decoder.startswith("onnx") else ["llama.cpp"])


def test_onnx_encoder_feeds_llama_cpp_decoder(tiny_bundle: Path, ref_image, xray_png: Path) -> None:
    """The composition no existing tool offers: ONNX Runtime's SigLIP into llama.cpp's Gemma 3."""
    ref_ids, ref_logits = ref_image
    pipe = medgemma_edge.load(tiny_bundle, encoder="onnx:fp32", decoder="gguf:f32")
    ids, logits = pipe.prompt_logits(PROMPT, [xray_png], SYSTEM)
    m = parity(ref_logits, logits)
    assert ids.tolist() == ref_ids.tolist() and m["mean_kl"] < 1e-4, m


def test_onnx_fp32_decoder_is_exact_on_text(tiny_bundle: Path, reference) -> None:
    ref_ids, ref_logits = reference.prompt_logits(PROMPT, [], SYSTEM)
    pipe = medgemma_edge.load(tiny_bundle, decoder="onnx:fp32", text_only=True)
    ids, logits = pipe.prompt_logits(PROMPT, [], SYSTEM)
    m = parity(ref_logits, logits)
    assert ids.tolist() == ref_ids.tolist() and m["mean_kl"] < 1e-4 and m["top1"] == 1.0, m


@pytest.mark.parametrize("encoder", ["onnx:fp32", "gguf:f32"])
def test_onnx_fp32_decoder_greedy_matches_transformers(tiny_bundle: Path, reference, xray_png: Path, encoder: str) -> None:
    n = 16
    ref_tokens, ref_step_logits = reference.greedy(PROMPT, [xray_png], n, SYSTEM)
    pipe = medgemma_edge.load(tiny_bundle, encoder=encoder, decoder="onnx:fp32")
    ours = medgemma_edge.generate(pipe, PROMPT, [xray_png], system=SYSTEM, sampling=SamplingParams(max_new_tokens=n))
    _, ref_logits = reference.prompt_logits(PROMPT, [xray_png], SYSTEM)
    _, our_logits = pipe.prompt_logits(PROMPT, [xray_png], SYSTEM)
    m = parity(ref_logits, our_logits)
    assert m["mean_kl"] < 1e-4, m
    share, agree = decisive_top1(ref_logits, our_logits)
    assert share >= 0.9 and agree
    # the near-tie rule of the spine: every greedy step must be decided by more than our error
    assert top2_margin(ref_step_logits).min() > 2 * m["max_abs"]
    assert ours.token_ids == [t for t in ref_tokens if t not in (1, 106)] and len(ours.token_ids) == n


def test_quantized_onnx_decoders_rank_by_bits(tiny_bundle: Path, reference) -> None:
    _, ref_logits = reference.prompt_logits(PROMPT, [], SYSTEM)
    kl = {}
    for decoder in ("onnx:fp32", "onnx:int8", "onnx:int4"):
        _, logits = medgemma_edge.load(tiny_bundle, decoder=decoder, text_only=True).prompt_logits(PROMPT, [], SYSTEM)
        kl[decoder] = parity(ref_logits, logits)["mean_kl"]
    assert kl["onnx:fp32"] < kl["onnx:int8"] < kl["onnx:int4"], kl


def test_mismatched_encoder_is_refused(tiny_bundle: Path) -> None:
    from medgemma_edge.backends.onnx.vision import OnnxEncoder

    bundle = medgemma_edge.open_bundle(tiny_bundle)
    with pytest.raises(medgemma_edge.UserError, match="another model"):
        OnnxEncoder(bundle.path(bundle.find("encoder", "onnx:fp32")), n_embd=512, tokens_per_image=16)
