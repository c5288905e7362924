"""The Gemma 3 family (MedGemma 4B, MedGemma 1.5 4B, 27B multimodal): `Gemma3ForConditionalGeneration`.

Its spec (read from a Hugging Face `config.json` in any of the layouts we accept), its checkpoint
tensor prefixes and tensor tables (GGUF decoder and mmproj names), and its refusals: shapes
llama.cpp would compute differently from transformers. The text half (`text_spec`, `text_problems`)
is shared with the text-only family, convert/models/gemma3_text.py (MedGemma 27B text).

The published MedGemma 4B config (transformers 4.50) spells RoPE as `rope_theta`/`rope_scaling`/
`rope_local_base_freq` and the layer mix as `sliding_window_pattern`; transformers 5 saves
`rope_parameters` per attention type and an explicit `layer_types` list. Both map onto one spec.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf

from convert.registry import Family, read_json, register
from medgemma_edge.errors import UserError

ARCHITECTURE = "Gemma3ForConditionalGeneration"

# Checkpoint name prefixes, longest-first: the published layout (transformers 4.50), then what newer
# versions save. Names are normalised to `text.`, `vision.` and `projector.` for the writers.
PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.model.", "text."),
    ("language_model.model.", "text."),
    ("model.language_model.", "text."),
    ("language_model.", "text."),
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
)
# Tensors with no place in the runtime: the LM head (Gemma 3 ties it to the embedding; llama.cpp
# writes none) and SigLIP's unused pooling head. Matched on canonical names.
IGNORED = ("lm_head.", "text.lm_head.", "vision.head.")

_T = gguf.MODEL_TENSOR
_N = gguf.TENSOR_NAMES
# canonical decoder name (under `text.`) -> GGUF tensor; `{bid}` is the layer index.
DECODER_TENSORS: dict[str, str] = {
    "embed_tokens.weight": _N[_T.TOKEN_EMBD] + ".weight",
    "norm.weight": _N[_T.OUTPUT_NORM] + ".weight",
    "layers.{bid}.input_layernorm.weight": _N[_T.ATTN_NORM] + ".weight",
    "layers.{bid}.self_attn.q_proj.weight": _N[_T.ATTN_Q] + ".weight",
    "layers.{bid}.self_attn.k_proj.weight": _N[_T.ATTN_K] + ".weight",
    "layers.{bid}.self_attn.v_proj.weight": _N[_T.ATTN_V] + ".weight",
    "layers.{bid}.self_attn.o_proj.weight": _N[_T.ATTN_OUT] + ".weight",
    "layers.{bid}.self_attn.q_norm.weight": _N[_T.ATTN_Q_NORM] + ".weight",
    "layers.{bid}.self_attn.k_norm.weight": _N[_T.ATTN_K_NORM] + ".weight",
    "layers.{bid}.post_attention_layernorm.weight": _N[_T.ATTN_POST_NORM] + ".weight",
    "layers.{bid}.pre_feedforward_layernorm.weight": _N[_T.FFN_NORM] + ".weight",
    "layers.{bid}.post_feedforward_layernorm.weight": _N[_T.FFN_POST_NORM] + ".weight",
    "layers.{bid}.mlp.gate_proj.weight": _N[_T.FFN_GATE] + ".weight",
    "layers.{bid}.mlp.up_proj.weight": _N[_T.FFN_UP] + ".weight",
    "layers.{bid}.mlp.down_proj.weight": _N[_T.FFN_DOWN] + ".weight",
}

# canonical vision/projector name -> mmproj tensor (names from llama.cpp tools/mtmd/clip-impl.h).
MMPROJ_TENSORS: dict[str, str] = {
    "vision.embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "vision.embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "vision.embeddings.position_embedding.weight": "v.position_embd.weight",
    "vision.post_layernorm.weight": "v.post_ln.weight",
    "vision.post_layernorm.bias": "v.post_ln.bias",
    "projector.mm_input_projection_weight": "mm.input_projection.weight",
    "projector.mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight",
}
_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}
for _src, _dst in _LAYER.items():
    for _p in ("weight", "bias"):
        MMPROJ_TENSORS[f"vision.encoder.layers.{{bid}}.{_src}.{_p}"] = f"v.blk.{{bid}}.{_dst}.{_p}"


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]  # "sliding_attention" | "full_attention", one per layer
    rope_theta: float  # global layers
    rope_local_theta: float  # sliding-window layers
    rope_linear_factor: float | None  # linear scaling on global layers (MedGemma 4B: 8)
    rms_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    hidden_activation: str
    final_logit_softcapping: float | None
    attn_logit_softcapping: float | None

    @property
    def is_swa(self) -> list[bool]:
        return [t == "sliding_attention" for t in self.layer_types]


@dataclass(frozen=True)
class VisionSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # preprocessor_config.json; every Gemma 3 so far: 0.5
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class MedGemmaSpec:
    text: TextSpec
    vision: VisionSpec | None  # None: a text-only checkpoint (Gemma3ForCausalLM), no image input at all
    tokens_per_image: int
    boi_token_id: int
    eoi_token_id: int
    image_token_id: int
    eos_token_ids: tuple[int, ...] = field(default=(1, 106))
    architecture: str = ARCHITECTURE

    @property
    def pool_factor(self) -> int:
        """Side length of the average-pooling kernel that turns the patch grid into image tokens."""
        if self.vision is None:
            raise ValueError(f"{self.architecture} has no vision part, so no pooling factor")
        return self.vision.patches_per_side // math.isqrt(self.tokens_per_image)

    def summary(self) -> dict[str, Any]:
        """The config summary the bundle manifest records (and the runtime checks against); a text-only
        spec writes no vision section and no image-token facts (the manifest reader treats them as optional)."""
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "text": {**asdict(self.text), "layer_types": list(self.text.layer_types)},
        }
        if self.vision is not None:
            out.update({
                "vision": {**asdict(self.vision), "image_mean": list(self.vision.image_mean),
                           "image_std": list(self.vision.image_std)},
                "tokens_per_image": self.tokens_per_image,
                "pool_factor": self.pool_factor,
                "image_token_id": self.image_token_id,
            })
        return {**out, "boi_token_id": self.boi_token_id, "eoi_token_id": self.eoi_token_id,
                "eos_token_ids": list(self.eos_token_ids)}


def _layer_types(tc: dict[str, Any], n_layers: int) -> tuple[str, ...]:
    if tc.get("layer_types"):
        return tuple(tc["layer_types"])
    # ref: transformers Gemma3TextConfig: layer i is global when (i + 1) % pattern == 0
    pattern = int(tc.get("sliding_window_pattern", tc.get("_sliding_window_pattern", 6)))
    return tuple(
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)
    )


def _rope(tc: dict[str, Any]) -> tuple[float, float, float | None]:
    params = tc.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        full, local = params["full_attention"], params.get("sliding_attention", {})
        factor = full.get("factor") if full.get("rope_type") == "linear" else None
        return float(full.get("rope_theta", 1e6)), float(local.get("rope_theta", 1e4)), factor
    scaling = tc.get("rope_scaling") or {}
    factor = scaling.get("factor") if scaling.get("rope_type", scaling.get("type")) == "linear" else None
    return float(tc.get("rope_theta", 1e6)), float(tc.get("rope_local_base_freq", 1e4)), factor


def text_spec(tc: dict[str, Any]) -> TextSpec:
    """The decoder's spec from a Gemma 3 text config (`text_config`, or the flat config of Gemma3ForCausalLM).

    Raises KeyError/TypeError/ValueError on a malformed config; callers turn them into one-line errors.
    """
    n_layers = int(tc["num_hidden_layers"])
    head_dim = int(tc.get("head_dim", 256))
    rope_theta, rope_local, factor = _rope(tc)
    return TextSpec(
        hidden_size=int(tc["hidden_size"]),
        intermediate_size=int(tc["intermediate_size"]),
        num_layers=n_layers,
        num_heads=int(tc["num_attention_heads"]),
        num_kv_heads=int(tc["num_key_value_heads"]),
        head_dim=head_dim,
        query_pre_attn_scalar=float(tc.get("query_pre_attn_scalar", head_dim)),
        sliding_window=int(tc.get("sliding_window", 1024)),
        layer_types=_layer_types(tc, n_layers),
        rope_theta=rope_theta,
        rope_local_theta=rope_local,
        rope_linear_factor=float(factor) if factor else None,
        rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
        vocab_size=int(tc.get("vocab_size", 262208)),
        max_position_embeddings=int(tc.get("max_position_embeddings", 131072)),
        hidden_activation=str(tc.get("hidden_activation", "gelu_pytorch_tanh")),
        final_logit_softcapping=tc.get("final_logit_softcapping"),
        attn_logit_softcapping=tc.get("attn_logit_softcapping"),
    )


def eos_ids(cfg: dict[str, Any], tc: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id", tc.get("eos_token_id", [1, 106]))
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos), 106)


def spec_from_config(cfg: dict[str, Any], source: str = "config.json",
                     preprocessor: dict[str, Any] | None = None) -> MedGemmaSpec:
    """`preprocessor`: preprocessor_config.json, for the image normalisation (default 0.5 / 0.5)."""
    tc, vc = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    try:
        text = text_spec(tc)
        vision = VisionSpec(
            hidden_size=int(vc["hidden_size"]),
            intermediate_size=int(vc["intermediate_size"]),
            num_layers=int(vc["num_hidden_layers"]),
            num_heads=int(vc["num_attention_heads"]),
            image_size=int(vc.get("image_size", 896)),
            patch_size=int(vc.get("patch_size", 14)),
            layer_norm_eps=float(vc.get("layer_norm_eps", 1e-6)),
            image_mean=_triple((preprocessor or {}).get("image_mean", 0.5)),
            image_std=_triple((preprocessor or {}).get("image_std", 0.5)),
        )
        spec = MedGemmaSpec(
            text=text,
            vision=vision,
            tokens_per_image=int(cfg.get("mm_tokens_per_image", 256)),
            boi_token_id=int(cfg.get("boi_token_index", 255999)),
            eoi_token_id=int(cfg.get("eoi_token_index", 256000)),
            image_token_id=int(cfg.get("image_token_index", 262144)),
            eos_token_ids=eos_ids(cfg, tc),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{source}: malformed MedGemma config ({exc!r}); is this a Gemma 3 checkpoint?") from exc
    check_runnable(spec, source)
    return spec


def _triple(value: Any) -> tuple[float, float, float]:
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"image_mean/image_std {value!r}: expected 3 finite numbers")
    return values[0], values[1], values[2]


def text_problems(t: TextSpec) -> list[str]:
    """What llama.cpp's Gemma 3 decoder would compute differently from transformers for this text config."""
    problems: list[str] = []
    # ref: llama.cpp src/models/gemma3.cpp scales queries by 1/sqrt(head_dim), or by 1/sqrt(n_embd / n_head)
    # (integer division) for the 62-layer 27B; it never reads query_pre_attn_scalar.
    if t.num_layers == 62:
        expected = float(t.hidden_size // t.num_heads)
        if t.hidden_size % t.num_heads:
            problems.append(f"hidden_size {t.hidden_size} is not a multiple of {t.num_heads} heads (a 62-layer "
                            f"model's query scale is llama.cpp's integer hidden/heads)")
    else:
        expected = float(t.head_dim)
    if t.query_pre_attn_scalar != expected:
        rule = "hidden/heads, as for every 62-layer model" if t.num_layers == 62 else "head_dim"
        problems.append(f"query_pre_attn_scalar {t.query_pre_attn_scalar:g} != {expected:g} (llama.cpp's fixed "
                        f"query scale: {rule})")
    if t.attn_logit_softcapping is not None:
        problems.append("attn_logit_softcapping is set (Gemma 3 has none; llama.cpp ignores it)")
    if t.hidden_activation != "gelu_pytorch_tanh":
        problems.append(f"hidden_activation {t.hidden_activation!r} (llama.cpp's Gemma 3 uses tanh GELU)")
    if len(t.layer_types) != t.num_layers:
        problems.append(f"{len(t.layer_types)} layer_types for {t.num_layers} layers")
    if t.num_heads % t.num_kv_heads:
        problems.append(f"{t.num_heads} heads not divisible by {t.num_kv_heads} KV heads")
    return problems


def refuse(problems: list[str], source: str) -> None:
    if problems:
        raise UserError(f"{source}: this checkpoint cannot run faithfully on llama.cpp: " + "; ".join(problems))


def check_runnable(spec: MedGemmaSpec, source: str) -> None:
    """Refuse shapes the llama.cpp runtime would silently compute differently from transformers."""
    t, v = spec.text, spec.vision
    problems = text_problems(t)
    if v is None:  # text-only: nothing below applies
        refuse(problems, source)
        return
    if v.intermediate_size == v.hidden_size:
        # ref: llama.cpp clip.cpp swaps ffn up/down for Gemma 3 when ffn_down's rows equal n_embd
        problems.append("vision intermediate_size equals hidden_size (mtmd would swap the FFN weights)")
    if v.image_size % v.patch_size:
        problems.append(f"image_size {v.image_size} not a multiple of patch_size {v.patch_size}")
    side = math.isqrt(spec.tokens_per_image)
    if side * side != spec.tokens_per_image or v.patches_per_side % side:
        problems.append(
            f"mm_tokens_per_image {spec.tokens_per_image} does not pool evenly from a "
            f"{v.patches_per_side}x{v.patches_per_side} patch grid"
        )
    if t.sliding_window < spec.tokens_per_image and any(t.is_swa):
        problems.append(
            f"sliding_window {t.sliding_window} < tokens per image {spec.tokens_per_image} "
            "(an image span would not fit one window, where llama.cpp and transformers disagree)"
        )
    refuse(problems, source)


def _parse(cfg: dict[str, Any], source: str, folder: Path | None) -> MedGemmaSpec:
    return spec_from_config(cfg, source, read_json(folder / "preprocessor_config.json") if folder else None)


FAMILY = register(Family(ARCHITECTURE, _parse, PREFIXES, IGNORED, "MedGemma 4B, MedGemma 1.5 4B, 27B multimodal"))
