"""The ONNX decoder graph (static in-place KV cache, standard Attention with the runtime's masks) against
transformers fp32 on the tiny checkpoint: past the sliding window, with an image that leaves it, across
the KV ring's wrap, after roll-backs, and at every precision. The decoders are written straight from
the checkpoint into a temporary folder (about a second each), independent of the session bundle.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from convert.checkpoint import Checkpoint
from convert.fidelity.metrics import decisive_top1, parity, top2_margin
from convert.registry import load_spec
from convert.writers.onnx_decoder import DEFAULT_ACCURACY_LEVEL, estimate_disk, write_onnx_decoder
from helpers import decoder_bound, openvino_plugin_kinds
from medgemma_edge import UserError
from medgemma_edge.backends.onnx.decoder import OnnxDecoderModel
from medgemma_edge.backends.onnx.session import provider_names

IMAGE_TOKEN = 262144
EOS = (1, 106)
N_NEW = 16


@pytest.fixture(scope="module")
def written(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    spec, ckpt = load_spec(tiny_ckpt), Checkpoint(tiny_ckpt)
    out = tmp_path_factory.mktemp("onnx-decoders")
    paths = {}
    for precision in ("fp32", "int8", "int4", "int4_b128"):
        paths[precision] = out / f"decoder-{precision}.onnx"
        write_onnx_decoder(ckpt, spec, paths[precision], precision)
    for precision in ("fp32", "int4"):  # the same contract from ops every execution provider has
        paths[f"{precision}-portable"] = out / f"decoder-{precision}-portable.onnx"
        write_onnx_decoder(ckpt, spec, paths[f"{precision}-portable"], precision, attention="portable")
    return {"spec": spec, "ckpt": ckpt, "config": spec.summary(), "paths": paths, "dir": out}


def model(written: dict[str, Any], precision: str, providers: list[str] | None = None,
          **text_overrides: Any) -> OnnxDecoderModel:
    config = written["config"]
    if text_overrides:
        config = {**config, "text": {**config["text"], **text_overrides}}
    return OnnxDecoderModel(written["paths"][precision], config, n_threads=2,
                            providers=provider_names(providers) if providers else None)


@pytest.fixture(scope="module")
def conversation(reference, xray_png: Path) -> dict[str, Any]:
    """An image first, then text long enough (101 positions, window 32) for the image to leave the window."""
    import torch

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this X-ray"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The lungs look clear and the heart is normal. " * 3}]},
        {"role": "user", "content": [{"type": "text", "text": "Is there an effusion on the left or the right side? " * 2}]},
    ]
    inputs = reference.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, return_tensors="pt",
                                                     processor_kwargs={"images": [Image.open(xray_png)]})
    with torch.no_grad():
        logits = reference.model(**inputs).logits[0].numpy()
        features = reference.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0].numpy()
        out = reference.model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True, top_p=None, top_k=None)
    ids = inputs["input_ids"][0].tolist()
    assert len(ids) > 3 * 32 and ids.index(IMAGE_TOKEN) < 32  # the window is 32: the image leaves it
    return {"ids": ids, "logits": logits, "features": features,
            "greedy": out.sequences[0, len(ids):].tolist(), "step_logits": np.stack([s[0].numpy() for s in out.logits])}


def prefill(decoder: Any, ids: list[int], features: np.ndarray, all_logits: bool = True) -> np.ndarray:
    """Evaluate a prompt as the runtime does: text runs causally, the image span in one bidirectional call."""
    first = ids.index(IMAGE_TOKEN) if IMAGE_TOKEN in ids else len(ids)
    last = first + (len(features) if IMAGE_TOKEN in ids else 0)
    outs = [decoder.eval_tokens(ids[:first], all_logits)] if first else []
    if last > first:
        outs.append(decoder.eval_embeddings(features, all_logits))
    if last < len(ids):
        outs.append(decoder.eval_tokens(ids[last:], all_logits))
    return np.concatenate(outs) if all_logits else outs[-1]


def greedy(decoder: Any, last: np.ndarray, n: int) -> list[int]:
    tokens = [int(last[-1].argmax())]
    while len(tokens) < n and tokens[-1] not in EOS:
        tokens.append(int(decoder.eval_tokens([tokens[-1]])[-1].argmax()))
    return tokens


@pytest.mark.parametrize(("graph", "providers"), [("fp32", None), ("fp32-portable", None),
                                                  ("fp32-portable", ["openvino", "cpu"])])
def test_fp32_matches_transformers_past_the_window(written: dict[str, Any], conversation: dict[str, Any],
                                                   graph: str, providers: list[str] | None) -> None:
    """On the CPU provider, and the portable graph on OpenVINO's (its plugin, in fp32): every node there,
    each call writing a second cache buffer (OpenVINO corrupts one bound as both input and output)."""
    if providers and not openvino_plugin_kinds():  # a non-Intel CPU: the plugin has no device, and says so
        with pytest.raises(UserError, match="lists no device on this machine .*--providers cpu"):
            model(written, graph, providers)
        return
    loaded = model(written, graph, providers)
    if providers:
        assert loaded.providers[0] == "OpenVINOExecutionProvider", loaded.providers
    decoder = loaded.new_context(256)
    logits = prefill(decoder, conversation["ids"], conversation["features"])
    m = parity(conversation["logits"], logits)
    assert m["mean_kl"] < 1e-4 and m["top1"] == 1.0, m
    share, agree = decisive_top1(conversation["logits"], logits)
    assert share >= 0.9 and agree
    # greedy: every step decided by more than our error, then the same 16 tokens, decoded one at a time
    assert top2_margin(conversation["step_logits"]).min() > 2 * m["max_abs"]
    assert greedy(decoder, logits[-1:], N_NEW) == conversation["greedy"]
    assert decoder.n_past == len(conversation["ids"]) + N_NEW - 1


@pytest.mark.parametrize("window_shift", [-1, 1])
def test_the_window_edge_is_where_transformers_puts_it(written: dict[str, Any], conversation: dict[str, Any],
                                                       window_shift: int) -> None:
    """The same graph with the mask's window one off (q - k < window +- 1) no longer matches: the parity
    above pins the edge. The runtime builds the mask, so the config's window is all that changes here."""
    window = written["spec"].text.sliding_window
    decoder = model(written, "fp32", sliding_window=window + window_shift).new_context(256)
    m = parity(conversation["logits"], prefill(decoder, conversation["ids"], conversation["features"]))
    assert m["mean_kl"] > 1e-3, m


def test_logits_for_the_last_position_unless_all_are_asked(written: dict[str, Any],
                                                           conversation: dict[str, Any]) -> None:
    decoder = model(written, "fp32").new_context(256)
    ids, features = conversation["ids"], conversation["features"]
    last = prefill(decoder, ids, features, all_logits=False)
    assert last.shape == (1, written["spec"].text.vocab_size)
    decoder.reset()
    every = prefill(decoder, ids, features)
    assert every.shape == (len(ids), written["spec"].text.vocab_size)
    np.testing.assert_allclose(last[0], every[-1], atol=1e-4)


@pytest.mark.parametrize("n_keep", [140, 100, 37, 0])
def test_truncate_rolls_back_exactly(written: dict[str, Any], caplog: pytest.LogCaptureFixture, n_keep: int) -> None:
    """Roll back after 150 text positions (window 32, ring of 63): to 140 the ring still holds the window
    (no recompute), to 100 and 37 it does not (the kept calls are evaluated again); then continue."""
    rng = np.random.default_rng(3)
    ids = rng.integers(1000, 200_000, 150).tolist()
    tail = rng.integers(1000, 200_000, 20).tolist()
    fresh = model(written, "fp32").new_context(256)
    expected = fresh.eval_tokens(ids[:n_keep] + tail, all_logits=True)[n_keep:]
    rolled = model(written, "fp32").new_context(256)
    rolled.eval_tokens(ids, all_logits=False)
    with caplog.at_level(logging.INFO, logger="medgemma_edge.backends.onnx.decoder"):
        rolled.truncate(n_keep)
    recomputed = "recomputing" in caplog.text
    assert recomputed == (0 < n_keep < 150 - 32), caplog.text
    assert rolled.n_past == n_keep
    np.testing.assert_allclose(rolled.eval_tokens(tail, all_logits=True), expected, atol=2e-4)


def test_quantized_decoders_stay_within_their_bounds_in_order(written: dict[str, Any],
                                                              conversation: dict[str, Any]) -> None:
    kl = {}
    for precision in ("fp32", "int8", "int4", "int4_b128"):
        decoder = model(written, precision).new_context(256)
        m = parity(conversation["logits"], prefill(decoder, conversation["ids"], conversation["features"]))
        max_kl, min_top1 = decoder_bound(f"onnx:{precision}")
        assert m["mean_kl"] < max_kl and m["top1"] >= min_top1 - 0.05, (precision, m)
        kl[precision] = m["mean_kl"]
    print("ONNX decoder mean KL against transformers, image + text:", {k: f"{v:.3g}" for k, v in kl.items()})
    assert kl["fp32"] < kl["int8"] < kl["int4"] < kl["int4_b128"], kl  # a quarter of the scales costs fidelity


def test_portable_graph_uses_only_common_ops_and_agrees_with_fused(written: dict[str, Any],
                                                                  conversation: dict[str, Any]) -> None:
    """`--onnx-attention portable`: opset 17, none of the ops DirectML or OpenVINO lack, and the int4 graph decides
    the conversation as the fused one does (the same weights; only the order of the arithmetic differs)."""
    import onnx

    proto = onnx.load(str(written["paths"]["int4-portable"]), load_external_data=False)
    ops = {n.op_type for n in proto.graph.node}
    assert {o.version for o in proto.opset_import if o.domain == ""} == {17}
    assert not ops & {"Attention", "TensorScatter", "Gelu"} and {"ScatterElements", "Softmax", "MatMul"} <= ops
    logits = {}
    for graph in ("int4", "int4-portable"):
        decoder = model(written, graph).new_context(256)
        logits[graph] = prefill(decoder, conversation["ids"], conversation["features"])
    # int8 activations (accuracy level 4) round a few values the other way, so the two differ by far less than
    # either differs from transformers, and agree wherever the fused graph's choice is decisive
    between = parity(logits["int4"], logits["int4-portable"])
    share, agree = decisive_top1(logits["int4"], logits["int4-portable"])
    assert between["mean_kl"] < 0.01 and share >= 0.5 and agree, (between, share)
    fused, portable = (parity(conversation["logits"], logits[g])["mean_kl"] for g in ("int4", "int4-portable"))
    assert portable < decoder_bound("onnx:int4")[0] and abs(portable - fused) < 0.05 * fused, (fused, portable)


def test_int8_activations_decide_as_fp32_activations(written: dict[str, Any], reference,
                                                     conversation: dict[str, Any]) -> None:
    """accuracy_level 4 (int8 activations, the default: 3x faster decode than 0) against level 0, teacher-forced
    along level 0's greedy answer to validate's prompts, text-only and with the image: every step that
    level 0 decides by more than twice the two levels' logit difference is decided the same way. (Free
    greedy answers differ on random weights at near-ties, margins 0.03-0.2 against differences ~0.8, at
    either level against transformers too: docs/onnx-decoder.md.)"""
    from convert.fidelity.inputs import PROMPTS
    from medgemma_edge.inputs.samples import SYSTEM

    assert DEFAULT_ACCURACY_LEVEL == 4
    cases = [(reference.inputs(p, [], SYSTEM)["input_ids"][0].tolist(), None) for p in PROMPTS]
    cases.append((conversation["ids"], conversation["features"]))
    for precision in ("int8", "int4"):
        level0 = written["dir"] / f"decoder-{precision}-level0.onnx"
        write_onnx_decoder(written["ckpt"], written["spec"], level0, precision, accuracy_level=0)
        m0 = OnnxDecoderModel(level0, written["config"], n_threads=2)
        m4 = OnnxDecoderModel(written["paths"][precision], written["config"], n_threads=2)
        decisive = 0
        for ids, features in cases:
            d0, d4 = m0.new_context(256), m4.new_context(256)
            l0, l4 = prefill(d0, ids, features, all_logits=False), prefill(d4, ids, features, all_logits=False)
            for _ in range(N_NEW):
                if top2_margin(l0[-1]) > 2 * np.abs(l0[-1] - l4[-1]).max():
                    decisive += 1
                    assert l0[-1].argmax() == l4[-1].argmax(), precision
                token = int(l0[-1].argmax())
                if token in EOS:
                    break
                l0, l4 = d0.eval_tokens([token]), d4.eval_tokens([token])
        assert decisive >= N_NEW * len(cases) // 2, (precision, decisive)  # most steps are decisive


def test_bad_calls_are_refused_and_change_nothing(written: dict[str, Any]) -> None:
    decoder = model(written, "fp32").new_context(64)
    hidden = written["spec"].text.hidden_size
    before = decoder.eval_tokens([2, 105, 2364], all_logits=True)
    with pytest.raises(UserError, match="another model"):
        decoder.eval_embeddings(np.zeros((16, hidden + 1), np.float32))
    with pytest.raises(UserError, match="another model"):
        decoder.eval_embeddings(np.zeros((decoder.chunk + 1, hidden), np.float32))
    with pytest.raises(UserError, match="context of 64"):
        decoder.eval_tokens(list(range(1000, 1070)))
    assert decoder.n_past == 3
    decoder.truncate(0)
    np.testing.assert_allclose(decoder.eval_tokens([2, 105, 2364], all_logits=True), before, atol=1e-5)


def test_providers_that_are_not_here_are_refused_in_one_line(written: dict[str, Any]) -> None:
    with pytest.raises(UserError, match=r"no TPU device here.*--providers (openvino:cpu,)?cpu"):
        model(written, "fp32-portable", ["openvino:tpu", "cpu"])  # a device OpenVINO never has
    with pytest.raises(UserError, match="CoreMLExecutionProvider is not available in this onnxruntime"):
        provider_names(["coreml", "cpu"])


def test_disk_estimate_covers_what_is_written(written: dict[str, Any]) -> None:
    for graph, path in written["paths"].items():
        precision = graph.removesuffix("-portable")
        size = path.stat().st_size + path.with_name(path.name + ".data").stat().st_size
        estimate = estimate_disk(written["spec"], precision)
        assert size <= estimate <= 1.2 * size + (8 << 20), (precision, size, estimate)


def test_27b_shape_rules(tmp_path: Path) -> None:
    """62 layers, head_dim 48 below hidden/heads 64 and query_pre_attn_scalar 64 (MedGemma 27B's rules,
    thin): the graph's query scale and head layout follow the config, as transformers does."""
    import torch

    from convert.fidelity.reference import Reference
    from medgemma_edge.extras import synthesize

    ckpt_dir = synthesize(tmp_path / "ckpt", size="tiny-27b", seed=1, progress=False)
    spec = load_spec(ckpt_dir)
    assert spec.text.num_layers == 62 and spec.text.query_pre_attn_scalar != spec.text.head_dim
    path = tmp_path / "decoder-fp32.onnx"
    write_onnx_decoder(Checkpoint(ckpt_dir), spec, path, "fp32")
    reference = Reference(ckpt_dir)
    inputs = reference.inputs("Describe this X-ray " + "and the heart " * 10, [], "You are an expert radiologist.")
    with torch.no_grad():
        expected = reference.model(**inputs).logits[0].numpy()
    portable = tmp_path / "decoder-fp32-portable.onnx"  # the query-head groups of another shape
    write_onnx_decoder(Checkpoint(ckpt_dir), spec, portable, "fp32", attention="portable")
    for graph in (path, portable):
        decoder = OnnxDecoderModel(graph, spec.summary(), n_threads=2).new_context(256)
        m = parity(expected, decoder.eval_tokens(inputs["input_ids"][0].tolist(), all_logits=True))
        assert m["mean_kl"] < 1e-4 and m["top1"] == 1.0, (graph.name, m)
    # o_proj reduces over 4 x 48 = 192 values: no whole 128-value blocks, refused before anything is written
    with pytest.raises(UserError, match=r"widths \[192\] are not multiples of the 128-value .* --onnx-decoder fp32"):
        write_onnx_decoder(Checkpoint(ckpt_dir), spec, tmp_path / "decoder-int4_b128.onnx", "int4_b128")
    assert not list(tmp_path.glob("decoder-int4_b128*"))
