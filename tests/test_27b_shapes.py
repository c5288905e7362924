"""MedGemma 27B's shape rules on thin layers, multimodal and text-only: f32 parity with transformers, the
refusals of what llama.cpp would compute differently, and the memory figures of the real 27B shapes.

27B has 62 layers, head_dim 128 and query_pre_attn_scalar = hidden/heads = 168 != head_dim. llama.cpp never
reads the scalar: it keys the query scale 1/sqrt(hidden/heads) on the 62-layer count (src/models/gemma3.cpp).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

import medgemma_edge
from convert.fidelity.metrics import decisive_top1, parity
from convert.fidelity.reference import Reference
from convert.models import gemma3, gemma3_text
from medgemma_edge import UserError
from medgemma_edge.extras import convert_checkpoint, synthesize
from medgemma_edge.runtime import sizing

PROMPT, SYSTEM = "Describe this X-ray", "You are an expert radiologist."
F32_KL = 1e-4  # the f32 contract (medgemma_edge/bundle/precisions.py)

# google/medgemma-27b-text-it's decoder shapes (/work/shared/MISSION.md; intermediate size as in Gemma 3 27B)
MEDGEMMA_27B_TEXT = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 5376,
    "intermediate_size": 21504, "num_hidden_layers": 62, "num_attention_heads": 32, "num_key_value_heads": 16,
    "head_dim": 128, "query_pre_attn_scalar": 168, "sliding_window": 1024, "sliding_window_pattern": 6,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "rms_norm_eps": 1e-06, "vocab_size": 262208, "max_position_embeddings": 131072, "eos_token_id": [1, 106],
}


SIZES = ["tiny-27b", "tiny-27b-text"]  # multimodal (Gemma3ForConditionalGeneration) and Gemma3ForCausalLM
_BUILT: dict[str, tuple[str, Path, Path, Reference]] = {}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """size -> (size, checkpoint, f32 bundle, transformers reference), each built once for the module."""
    def get(size: str) -> tuple[str, Path, Path, Reference]:
        if size not in _BUILT:
            work = tmp_path_factory.mktemp(size)
            ckpt = synthesize(work / "ckpt", size=size, seed=2, progress=False)
            text_only = size.endswith("-text")
            convert_checkpoint(ckpt, work / "bundle", ["f32"], [] if text_only else ["f32"], progress=False)
            _BUILT[size] = (size, ckpt, work / "bundle", Reference(ckpt))
        return _BUILT[size]
    yield get
    _BUILT.clear()


@pytest.fixture(params=SIZES)
def case(request: pytest.FixtureRequest, built):
    return built(request.param)


def test_the_checkpoint_has_the_27b_rules(case) -> None:
    size, ckpt, bundle, _ = case
    cfg = json.loads((ckpt / "config.json").read_text())
    t = cfg if size.endswith("-text") else cfg["text_config"]
    assert t["num_hidden_layers"] == 62
    assert t["query_pre_attn_scalar"] == t["hidden_size"] // t["num_attention_heads"] != t["head_dim"]
    reader = gguf.GGUFReader(bundle / "decoder-f32.gguf")
    assert reader.fields["gemma3.block_count"].contents() == 62  # the count llama.cpp keys its scale on


def test_f32_parity_text(case) -> None:
    size, _, bundle, ref = case
    ref_ids, ref_logits = ref.prompt_logits(PROMPT, [], SYSTEM)
    pipe = medgemma_edge.load(bundle, decoder="gguf:f32", text_only=True)
    ids, logits = pipe.prompt_logits(PROMPT, [], SYSTEM)
    pipe.close()
    assert ids.tolist() == ref_ids.tolist()
    m = parity(ref_logits, logits)
    share, agree = decisive_top1(ref_logits, logits)
    print(f"{size} text, gguf:f32 vs transformers: mean KL {m['mean_kl']:.2e}, top-1 {m['top1']:.3f}")
    assert m["mean_kl"] < F32_KL and share >= 0.9 and agree, (m, share)


def test_f32_parity_image(built, xray_png: Path) -> None:
    _, _, bundle, ref = built("tiny-27b")  # the text-only variant takes no image (tests/test_text_only.py)
    ref_ids, ref_logits = ref.prompt_logits(PROMPT, [xray_png], SYSTEM)
    pipe = medgemma_edge.load(bundle, decoder="gguf:f32", encoder="gguf:f32")
    ids, logits = pipe.prompt_logits(PROMPT, [xray_png], SYSTEM)
    pipe.close()
    assert ids.tolist() == ref_ids.tolist() and (ids == 262144).sum() == 16
    m = parity(ref_logits, logits)
    share, agree = decisive_top1(ref_logits, logits)
    print(f"tiny-27b image+text, gguf:f32+gguf:f32 vs transformers: mean KL {m['mean_kl']:.2e}, top-1 {m['top1']:.3f}")
    assert m["mean_kl"] < F32_KL and share >= 0.9 and agree, (m, share)


def test_parity_would_catch_the_head_dim_scale(case) -> None:
    """The control: transformers run with 1/sqrt(head_dim) (the rule of every other layer count) is far from
    llama.cpp, so the parity above really measures the 62-layer query scale."""
    _, _, bundle, ref = case
    model = ref.model.model
    layers = model.layers if hasattr(model, "layers") else model.language_model.layers
    saved = [layer.self_attn.scaling for layer in layers]
    head_dim = layers[0].self_attn.head_dim
    try:
        for layer in layers:
            layer.self_attn.scaling = head_dim ** -0.5
        _, wrong = ref.prompt_logits(PROMPT, [], SYSTEM)
    finally:
        for layer, s in zip(layers, saved):
            layer.self_attn.scaling = s
    pipe = medgemma_edge.load(bundle, decoder="gguf:f32", text_only=True)
    _, logits = pipe.prompt_logits(PROMPT, [], SYSTEM)
    pipe.close()
    assert parity(wrong, logits)["mean_kl"] > 100 * F32_KL


def _text_cfg(**changes: object) -> dict:
    return {**MEDGEMMA_27B_TEXT, **changes}


def test_the_real_27b_text_config_is_accepted_as_llama_cpp_computes_it() -> None:
    spec = gemma3_text.spec_from_config(_text_cfg())
    assert spec.vision is None and spec.text.query_pre_attn_scalar == 168 and spec.text.head_dim == 128
    assert "vision" not in spec.summary() and spec.summary()["architecture"] == "Gemma3ForCausalLM"


@pytest.mark.parametrize("changes,named", [
    ({"query_pre_attn_scalar": 128}, "query_pre_attn_scalar 128 != 168"),  # head_dim: not what llama.cpp runs at 62
    ({"num_hidden_layers": 61, "sliding_window_pattern": 6}, "query_pre_attn_scalar 168 != 128"),  # no 27B rule
    ({"hidden_size": 5377}, "not a multiple of 32 heads"),  # llama.cpp divides in integers
])
def test_refuses_what_llama_cpp_would_compute_differently(changes: dict, named: str) -> None:
    with pytest.raises(UserError, match=named):
        gemma3_text.spec_from_config(_text_cfg(**changes), "27b/config.json")
    multimodal = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": _text_cfg(**changes),
                  "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                    "num_attention_heads": 16}}
    with pytest.raises(UserError, match=named):
        gemma3.spec_from_config(multimodal, "27b-mm/config.json")


def test_memory_figures_of_the_real_27b_text_model() -> None:
    """From the shapes alone (the files are 16-108 GB): llama.cpp's own type mix per precision."""
    config = gemma3_text.spec_from_config(_text_cfg()).summary()
    text = config["text"]
    params = 262208 * 5376 + 62 * (5376 * 4096 * 2 + 5376 * 2048 * 2 + 3 * 5376 * 21504)
    assert params == pytest.approx(27.0e9, rel=0.01)
    assert sizing.gguf_decoder_bytes(text, "f32") == pytest.approx(108e9, rel=0.01)  # MISSION: 108 GB f32 scratch
    assert sizing.gguf_decoder_bytes(text, "bf16") == pytest.approx(54e9, rel=0.01)  # the base the converter writes
    q8, q4 = sizing.gguf_decoder_bytes(text, "q8_0"), sizing.gguf_decoder_bytes(text, "q4_k_m")
    assert q8 == pytest.approx(params * 34 / 32, rel=0.005)  # every matrix Q8_0: 8.5 bits a weight
    types = sizing.tensor_types(text, "q4_k_m")
    assert types["token_embd.weight"][0] == "Q6_K"  # tied: quantized as the output tensor
    # attn_v and ffn_down of llama.cpp's "more bits" layers: the first 7, the last 8 and 15 between (of 62)
    assert sum(t == "Q6_K" for t, _ in types.values()) == 1 + 2 * (7 + 8 + 15)
    assert 4.8 < q4 * 8 / params < 5.0  # Q4_K_M's mix: about 4.9 bits a weight
    # 10 global layers keep the whole context, 52 sliding ones pad256(window + batch) = 1536 cells; f16 K and V
    kv = (10 * 4096 + 52 * 1536) * 2 * 16 * 128 * 2
    for precision, weights in (("q4_k_m", q4), ("q8_0", q8)):
        figures = sizing.load_figures(config, precision, n_ctx=4096)
        assert figures["weights"] == weights and figures["kv_cache"] == kv
    line = sizing.describe(config, ["q4_k_m", "q8_0"])
    assert line.startswith("q4_k_m 15.4 GiB file, 17.0 GiB to load; q8_0 26.7 GiB file, 28.3 GiB to load"), line


@pytest.mark.parametrize("precision", ["f32", "f16", "bf16", "q8_0", "q4_k_m", "q4_0"])
def test_sizing_is_llama_cpps_own_choice(tiny_bundle: Path, precision: str) -> None:
    """Every tensor's type as llama.cpp's quantizer chose it in the tiny bundle, and the file size to the metadata."""
    config = json.loads((tiny_bundle / "manifest.json").read_text())["config"]
    path = tiny_bundle / f"decoder-{precision}.gguf"
    reader = gguf.GGUFReader(path)
    predicted = sizing.tensor_types(config["text"], precision)
    assert {t.name: t.tensor_type.name for t in reader.tensors} == {k: v[0] for k, v in predicted.items()}
    assert abs(sizing.gguf_decoder_bytes(config["text"], precision) - path.stat().st_size) < sizing.METADATA_BYTES


def test_sizing_matches_the_real_270m_q4_k_m() -> None:
    """A GGUF we did not write: Google's 270M as the package ships it (640-wide rows fall back from Q4_K)."""
    from convert.fidelity.trained import package_gguf

    text = {"hidden_size": 640, "intermediate_size": 2048, "num_layers": 18, "num_heads": 4, "num_kv_heads": 1,
            "head_dim": 256, "vocab_size": 262144}
    reader = gguf.GGUFReader(package_gguf())
    predicted = sizing.tensor_types(text, "q4_k_m")
    assert {t.name: t.tensor_type.name for t in reader.tensors} == {k: v[0] for k, v in predicted.items()}
    assert abs(sizing.gguf_decoder_bytes(text, "q4_k_m") - package_gguf().stat().st_size) < sizing.METADATA_BYTES
    for name, width in (("F32", 4), ("Q4_K", 144), ("Q6_K", 210)):
        assert sizing.GGML_BLOCKS[name][1] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1] == width
