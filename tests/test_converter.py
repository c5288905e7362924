"""The GGUF converter, read back with the `gguf` package's reader: every metadata key and every tensor
must equal the safetensors source after the documented transforms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from convert.checkpoint import Checkpoint
from convert.models.gemma3 import DECODER_TENSORS
from convert.models.gemma3 import MMPROJ_TENSORS
from convert.registry import load_spec
from medgemma_edge import UserError, open_bundle
from medgemma_edge.extras import convert_checkpoint, synthesize

Q = gguf.GGMLQuantizationType


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return reader, {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _expected_names(table: dict[str, str], ckpt: Checkpoint, namespace_prefix: str = "") -> dict[str, str]:
    """gguf name -> canonical checkpoint name, expanding `{bid}` over the checkpoint's layers."""
    out = {}
    for src, dst in table.items():
        if "{bid}" not in src:
            out[dst] = namespace_prefix + src
            continue
        for bid in range(64):
            name = namespace_prefix + src.format(bid=bid)
            if ckpt.has(name):
                out[dst.format(bid=bid)] = name
    return out


def test_decoder_metadata(tiny_bundle: Path, tiny_ckpt: Path) -> None:
    spec = load_spec(tiny_ckpt)
    t = spec.text
    _, f = _fields(tiny_bundle / "decoder-f32.gguf")
    expected = {
        "general.architecture": "gemma3", "general.file_type": 0,
        "gemma3.context_length": t.max_position_embeddings, "gemma3.embedding_length": t.hidden_size,
        "gemma3.feed_forward_length": t.intermediate_size, "gemma3.block_count": t.num_layers,
        "gemma3.attention.head_count": t.num_heads, "gemma3.attention.head_count_kv": t.num_kv_heads,
        "gemma3.attention.key_length": t.head_dim, "gemma3.attention.value_length": t.head_dim,
        "gemma3.attention.sliding_window": t.sliding_window,
        "gemma3.attention.sliding_window_pattern": [True] * 5 + [False],
        "gemma3.rope.freq_base": 1e6, "gemma3.rope.freq_base_swa": 1e4,
        "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.eot_token_id": 106, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": False,
    }
    for key, value in expected.items():
        assert f[key] == pytest.approx(value), key
    assert f["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == t.vocab_size == 262208
    assert tokens[105] == "<start_of_turn>" and tokens[255999] == "<start_of_image>" and tokens[262144] == "<image_soft_token>"
    assert f["tokenizer.ggml.token_type"][262144] == gguf.TokenType.CONTROL
    assert "<start_of_image>" in f["tokenizer.chat_template"]


def test_decoder_tensors_equal_source(tiny_bundle: Path, tiny_ckpt: Path) -> None:
    ckpt = Checkpoint(tiny_ckpt)
    reader, _ = _fields(tiny_bundle / "decoder-f32.gguf")
    expected = _expected_names(DECODER_TENSORS, ckpt, "text.")
    assert {t.name for t in reader.tensors} == set(expected)  # no tensor missing, none extra (tied: no output.weight)
    for tensor in reader.tensors:
        src = ckpt.get(expected[tensor.name])
        # ref: Gemma3RMSNorm multiplies by (1 + w); llama.cpp by the stored weight
        want = src + 1.0 if expected[tensor.name].endswith("norm.weight") else src
        assert tensor.tensor_type == Q.F32
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(want.shape), want, err_msg=tensor.name)


@pytest.mark.parametrize("precision", ["f32", "f16", "q8_0"])
def test_mmproj_tensors_equal_source(tiny_bundle: Path, tiny_ckpt: Path, precision: str) -> None:
    ckpt = Checkpoint(tiny_ckpt)
    spec = load_spec(tiny_ckpt)
    reader, f = _fields(tiny_bundle / f"mmproj-{precision}.gguf")
    assert f["general.architecture"] == "clip" and f["clip.projector_type"] == "gemma3"
    assert f["clip.has_vision_encoder"] is True and f["clip.use_gelu"] is True
    v = spec.vision
    for key, value in {"clip.vision.image_size": v.image_size, "clip.vision.patch_size": v.patch_size,
                       "clip.vision.embedding_length": v.hidden_size, "clip.vision.feed_forward_length": v.intermediate_size,
                       "clip.vision.block_count": v.num_layers, "clip.vision.attention.head_count": v.num_heads,
                       "clip.vision.projection_dim": spec.text.hidden_size,
                       "clip.vision.projector.scale_factor": spec.pool_factor}.items():
        assert f[key] == value, key
    assert f["clip.vision.image_mean"] == f["clip.vision.image_std"] == pytest.approx([0.5] * 3)
    expected = {}
    for src, dst in MMPROJ_TENSORS.items():
        expected.update(_expected_names({src: dst}, ckpt))
    assert {t.name for t in reader.tensors} == set(expected)
    for tensor in reader.tensors:
        name = expected[tensor.name]
        src = ckpt.get(name)
        want = src + 1.0 if name == "projector.mm_soft_emb_norm.weight" else src
        got = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(want.shape)
        if tensor.name == "mm.input_projection.weight":
            assert tensor.tensor_type == (Q.F32 if precision == "f32" else Q.F16)  # never quantized
        if src.ndim == 1 or tensor.name.startswith(("v.patch_embd", "v.position_embd")):
            assert tensor.tensor_type == Q.F32, tensor.name
        # tolerances per storage type: exact, fp16 rounding, Q8_0 block rounding (scale/254 per value)
        if tensor.tensor_type == Q.F32:
            np.testing.assert_array_equal(got, want, err_msg=tensor.name)
        elif tensor.tensor_type == Q.F16:
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6, err_msg=tensor.name)
        else:
            assert tensor.tensor_type == Q.Q8_0
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert (np.abs(got.reshape(-1, 32) - blocks) <= step * 0.6 + 1e-6).all(), tensor.name


def test_manifest(tiny_bundle: Path, tiny_ckpt: Path) -> None:
    bundle = open_bundle(tiny_bundle)
    m = bundle.manifest
    assert m["converter"]["name"] == "medgemma-edge" and m["converter"]["version"]
    assert set(m["source"]["files"]) >= {"config.json", "model.safetensors", "tokenizer.model"}
    assert m["source"]["files"]["config.json"] == __import__("hashlib").sha256((tiny_ckpt / "config.json").read_bytes()).hexdigest()
    assert m["config"]["tokens_per_image"] == 16 and m["config"]["pool_factor"] == 2
    ids = {(a.kind, a.id) for a in bundle.artifacts}
    assert ("decoder", "gguf:q4_k_m") in ids and ("encoder", "gguf:q8_0") in ids
    for a in bundle.artifacts:
        assert a.size == (tiny_bundle / a.file).stat().st_size and len(a.sha256) == 64
    bundle.verify()


def test_newer_transformers_layout_converts_identically(tiny_ckpt: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """transformers >= 4.52 names tensors `model.language_model.*`, `model.vision_tower.*` (5.x without
    `vision_model`) and writes `rope_parameters`/`layer_types`; the converter must give identical GGUFs.
    transformers 5 maps names back to the published layout on save, so the state dict is saved as is."""
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert any(k.startswith("model.vision_tower.encoder.") for k in state)
    newer = tmp_path / "newer"
    model.config.save_pretrained(newer)
    save_file(state, newer / "model.safetensors")
    for name in ("tokenizer.model", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        shutil.copy(tiny_ckpt / name, newer / name)
    saved = json.loads((newer / "config.json").read_text())
    assert "rope_parameters" in saved["text_config"] and "layer_types" in saved["text_config"]
    out = convert_checkpoint(newer, tmp_path / "bundle", ["f32"], ["f32"], progress=False)
    for kind in ("decoder", "encoder"):
        new = next(a for a in out.artifacts if a.kind == kind)
        old = next(a for a in open_bundle(tiny_bundle).artifacts if a.kind == kind and a.precision == "f32")
        assert new.sha256 == old.sha256, kind


def test_refuses_config_llama_cpp_cannot_run(tiny_ckpt: Path, tmp_path: Path) -> None:
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    cfg["text_config"]["query_pre_attn_scalar"] = 32
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="query_pre_attn_scalar"):
        load_spec(bad)


def test_other_shapes_convert_and_match(tmp_path: Path, xray_png: Path) -> None:
    """Another layer count, head size, window pattern, image size, patch size and tokens per image."""
    import medgemma_edge
    from convert.fidelity.metrics import parity
    from convert.fidelity.reference import Reference

    ckpt = synthesize(tmp_path / "ckpt", size="tiny", seed=3, num_hidden_layers=4, sliding_window_pattern=2,
                      head_dim=32, num_attention_heads=8, num_key_value_heads=8, image_size=56, patch_size=14,
                      mm_tokens_per_image=4, vision_layers=1, sliding_window=24)
    bundle = convert_checkpoint(ckpt, tmp_path / "bundle", ["f32"], ["f32"], progress=False)
    ref_ids, ref_logits = Reference(ckpt).prompt_logits("What is shown?", [xray_png, xray_png])
    pipe = medgemma_edge.load(bundle.dir)
    ids, logits = pipe.prompt_logits("What is shown?", [xray_png, xray_png])
    assert ids.tolist() == ref_ids.tolist() and (ids == 262144).sum() == 8
    m = parity(ref_logits, logits)
    assert m["mean_kl"] < 1e-4, m


def test_a_checkpoint_with_only_tokenizer_model_places_image_markers_by_id(tiny_ckpt: Path, tiny_bundle: Path,
                                                                           xray_png: Path, tmp_path: Path) -> None:
    """Fine-tunes ship trimmed tokenizer files: with no tokenizer_config.json declaring `<start_of_image>`, the
    markers still come from config.json's ids, so the prompt (and logits) equal the full checkpoint's."""
    import medgemma_edge
    from helpers import linked_copy

    trimmed = linked_copy(tiny_ckpt, tmp_path / "ckpt")
    for name in ("tokenizer_config.json", "tokenizer.json", "added_tokens.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        (trimmed / name).unlink(missing_ok=True)
    assert {p.name for p in trimmed.iterdir() if p.name.startswith(("tokenizer", "added", "special"))} == \
        {"tokenizer.model"}
    convert_checkpoint(trimmed, tmp_path / "bundle", ["f32"], ["f32"], progress=False)
    question = "Describe this X-ray <start_of_image> as text"  # marker text typed by a user stays text
    with medgemma_edge.load(tmp_path / "bundle", decoder="gguf:f32", encoder="gguf:f32") as pipe:
        ids, logits = pipe.prompt_logits(question, [xray_png], "You are an expert radiologist.")
    with medgemma_edge.load(tiny_bundle, decoder="gguf:f32", encoder="gguf:f32", verify=False) as pipe:
        full_ids, full_logits = pipe.prompt_logits(question, [xray_png], "You are an expert radiologist.")
    assert ids.tolist() == full_ids.tolist()
    assert (ids == 255999).sum() == 1 and (ids == 256000).sum() == 1  # only the template's own markers
    np.testing.assert_allclose(logits, full_logits, atol=1e-4, rtol=0)
