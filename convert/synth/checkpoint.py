"""Synthetic MedGemma checkpoints: random weights in the exact published layout.

Speed does not depend on weight values, and parity only needs the reference and the artifacts to
see the same weights, so tests and benchmarks run on these instead of downloaded weights.
Tensors are generated chunk by chunk and streamed into safetensors, so even `4b` (8.6 GB bf16)
never holds more than one chunk in memory.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medgemma_edge.errors import UserError
from medgemma_edge.fsutil import publishing_dir

log = logging.getLogger(__name__)

# Shapes of MedGemma 4B (google/medgemma-4b-it config.json). query_pre_attn_scalar None: head_dim.
# text_only: a flat Gemma3ForCausalLM checkpoint (`model.*` tensors, no vision tower), as MedGemma 27B text-it.
PRESETS: dict[str, dict[str, Any]] = {
    "4b": dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, sliding_window=1024, sliding_window_pattern=6,
        vision_hidden_size=1152, vision_intermediate_size=4304, vision_layers=27, vision_heads=16,
        image_size=896, patch_size=14, mm_tokens_per_image=256, init="standard",
        query_pre_attn_scalar=None, text_only=False,
    ),
    # Small enough for CI, big enough to mean something: one global layer among five sliding
    # ones, a window shorter than a test prompt, rows a multiple of 256 so Q4_K really applies.
    "tiny": dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, sliding_window=32, sliding_window_pattern=6,
        vision_hidden_size=128, vision_intermediate_size=256, vision_layers=2, vision_heads=4,
        image_size=64, patch_size=8, mm_tokens_per_image=16, init="peaked",
        query_pre_attn_scalar=None, text_only=False,
    ),
}
PRESETS["tiny-text"] = {**PRESETS["tiny"], "text_only": True}
# MedGemma 27B's rules on thin layers: 62 of them (the count llama.cpp keys its query scale on), head_dim
# below hidden/heads (27B: 128 < 5376/32 = 168; here 48 < 256/4 = 64) and query_pre_attn_scalar = hidden/heads.
PRESETS["tiny-27b"] = {**PRESETS["tiny"], "num_hidden_layers": 62, "intermediate_size": 256, "head_dim": 48,
                       "query_pre_attn_scalar": 64}
PRESETS["tiny-27b-text"] = {**PRESETS["tiny-27b"], "text_only": True}
VOCAB_SIZE = 262208
SHARD_BYTES = 2 << 30


def _text_config(p: dict[str, Any]) -> dict[str, Any]:
    head_dim = p["head_dim"]
    return {
        "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
        "cache_implementation": "hybrid", "final_logit_softcapping": None, "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": p["hidden_size"],
        "initializer_range": 0.02, "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": 131072, "model_type": "gemma3_text",
        "num_attention_heads": p["num_attention_heads"], "num_hidden_layers": p["num_hidden_layers"],
        "num_key_value_heads": p["num_key_value_heads"],
        "query_pre_attn_scalar": p["query_pre_attn_scalar"] or head_dim,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
        "sliding_window": p["sliding_window"], "sliding_window_pattern": p["sliding_window_pattern"],
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": VOCAB_SIZE,
    }


def build_config(p: dict[str, Any]) -> dict[str, Any]:
    """config.json exactly as the published MedGemma 4B spells it (transformers 4.50 keys); text-only: the
    flat Gemma3ForCausalLM config MedGemma 27B text-it publishes."""
    if p["text_only"]:
        return {"architectures": ["Gemma3ForCausalLM"], "bos_token_id": 2, "eos_token_id": [1, 106],
                "pad_token_id": 0, **_text_config(p), "transformers_version": "4.51.3"}
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": 255999,
        "eoi_token_index": 256000,
        "eos_token_id": [1, 106],
        "image_token_index": 262144,
        "initializer_range": 0.02,
        "mm_tokens_per_image": p["mm_tokens_per_image"],
        "model_type": "gemma3",
        "text_config": _text_config(p),
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.0.dev0",
        "vision_config": {
            "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": p["vision_hidden_size"], "image_size": p["image_size"],
            "intermediate_size": p["vision_intermediate_size"], "layer_norm_eps": 1e-06,
            "model_type": "siglip_vision_model", "num_attention_heads": p["vision_heads"],
            "num_channels": 3, "num_hidden_layers": p["vision_layers"], "patch_size": p["patch_size"],
            "torch_dtype": "bfloat16", "vision_use_head": False,
        },
    }


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    kind: str  # "embed" | "matrix" | "norm" (Gemma, stored as w, used as 1+w) | "ln_w" | "bias"


def tensor_plan(p: dict[str, Any]) -> list[TensorPlan]:
    """Every tensor of the published layout, in safetensors order."""
    h, ff, hd = p["hidden_size"], p["intermediate_size"], p["head_dim"]
    nh, nkv = p["num_attention_heads"], p["num_key_value_heads"]
    vh, vff = p["vision_hidden_size"], p["vision_intermediate_size"]
    n_patches = (p["image_size"] // p["patch_size"]) ** 2
    lm = "model." if p["text_only"] else "language_model.model."  # Gemma3ForCausalLM / the published VLM
    out = [TensorPlan(lm + "embed_tokens.weight", (VOCAB_SIZE, h), "embed")]
    for i in range(p["num_hidden_layers"]):
        b = f"{lm}layers.{i}."
        out += [
            TensorPlan(b + "input_layernorm.weight", (h,), "norm"),
            TensorPlan(b + "self_attn.q_proj.weight", (nh * hd, h), "matrix"),
            TensorPlan(b + "self_attn.k_proj.weight", (nkv * hd, h), "matrix"),
            TensorPlan(b + "self_attn.v_proj.weight", (nkv * hd, h), "matrix"),
            TensorPlan(b + "self_attn.o_proj.weight", (h, nh * hd), "matrix"),
            TensorPlan(b + "self_attn.q_norm.weight", (hd,), "norm"),
            TensorPlan(b + "self_attn.k_norm.weight", (hd,), "norm"),
            TensorPlan(b + "post_attention_layernorm.weight", (h,), "norm"),
            TensorPlan(b + "pre_feedforward_layernorm.weight", (h,), "norm"),
            TensorPlan(b + "post_feedforward_layernorm.weight", (h,), "norm"),
            TensorPlan(b + "mlp.gate_proj.weight", (ff, h), "matrix"),
            TensorPlan(b + "mlp.up_proj.weight", (ff, h), "matrix"),
            TensorPlan(b + "mlp.down_proj.weight", (h, ff), "matrix"),
        ]
    out.append(TensorPlan(lm + "norm.weight", (h,), "norm"))
    if p["text_only"]:
        return out
    v = "vision_tower.vision_model."
    out += [
        TensorPlan(v + "embeddings.patch_embedding.weight", (vh, 3, p["patch_size"], p["patch_size"]), "matrix"),
        TensorPlan(v + "embeddings.patch_embedding.bias", (vh,), "bias"),
        TensorPlan(v + "embeddings.position_embedding.weight", (n_patches, vh), "embed_pos"),
    ]
    for i in range(p["vision_layers"]):
        b = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += [TensorPlan(b + f"self_attn.{proj}.weight", (vh, vh), "matrix"),
                    TensorPlan(b + f"self_attn.{proj}.bias", (vh,), "bias")]
        out += [
            TensorPlan(b + "layer_norm1.weight", (vh,), "ln_w"), TensorPlan(b + "layer_norm1.bias", (vh,), "bias"),
            TensorPlan(b + "layer_norm2.weight", (vh,), "ln_w"), TensorPlan(b + "layer_norm2.bias", (vh,), "bias"),
            TensorPlan(b + "mlp.fc1.weight", (vff, vh), "matrix"), TensorPlan(b + "mlp.fc1.bias", (vff,), "bias"),
            TensorPlan(b + "mlp.fc2.weight", (vh, vff), "matrix"), TensorPlan(b + "mlp.fc2.bias", (vh,), "bias"),
        ]
    out += [
        TensorPlan(v + "post_layernorm.weight", (vh,), "ln_w"),
        TensorPlan(v + "post_layernorm.bias", (vh,), "bias"),
        TensorPlan("multi_modal_projector.mm_input_projection_weight", (vh, h), "proj"),
        TensorPlan("multi_modal_projector.mm_soft_emb_norm.weight", (vh,), "norm"),
    ]
    return out


def _scale(t: TensorPlan, init: str) -> tuple[float, float]:
    """(mean, std) of one tensor's values.

    "standard" mimics a trained model's magnitudes; "peaked" makes the tiny model's logits sharp
    (embedding std 0.3 x sqrt(256) gives logit std ~5), so greedy parity cannot pass on near-ties.
    """
    fan_in = math.prod(t.shape[1:]) if len(t.shape) > 1 else 1
    if t.kind == "norm":
        # used as 1 + w: a non-zero w makes a missing +1 visible. In "peaked" mode the residual
        # branches get gain 3 and the final norm gain 6, so the tied embedding does not just
        # predict the current token again, and logits are sharp but not saturated.
        if init == "peaked" and t.name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
            return 2.0, 0.1
        if init == "peaked" and t.name in ("language_model.model.norm.weight", "model.norm.weight"):
            return 5.0, 0.1
        return 0.0, 0.1
    if t.kind == "ln_w":
        return 1.0, 0.1
    if t.kind == "bias":
        return 0.0, 0.02
    if init == "standard":
        return 0.0, 0.02
    if t.kind == "embed":
        return 0.0, 0.1
    if t.kind == "proj":
        return 0.0, 1.0 / math.sqrt(t.shape[0])
    return 0.0, 1.0 / math.sqrt(fan_in)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with round-to-nearest-even (numpy has no bf16 dtype)."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def _chunks(t: TensorPlan, rng: np.random.Generator, init: str, max_elems: int = 1 << 24) -> Iterator[bytes]:
    mean, std = _scale(t, init)
    n = math.prod(t.shape)
    for start in range(0, n, max_elems):
        x = rng.standard_normal(min(max_elems, n - start), dtype=np.float32) * np.float32(std) + np.float32(mean)
        yield _to_bf16(x).tobytes()


def _write_safetensors(path: Path, tensors: list[TensorPlan], emit: Callable[[TensorPlan], Iterator[bytes]],
                       bar: tqdm) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        nbytes = 2 * math.prod(t.shape)
        header[t.name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the spec asks for an 8-byte aligned data section
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            for block in emit(t):
                f.write(block)
                bar.update(len(block))


def _shards(plan: list[TensorPlan], shard_bytes: int) -> list[list[TensorPlan]]:
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in plan:
        nbytes = 2 * math.prod(t.shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def synth_params(size: str, **overrides: Any) -> dict[str, Any]:
    if size not in PRESETS:
        raise UserError(f"unknown synthetic size {size!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - set(PRESETS[size])
    if unknown:
        raise UserError(f"unknown synthetic shape option(s) {sorted(unknown)}; known: {sorted(PRESETS[size])}")
    return {**PRESETS[size], **overrides}


def synthesize(out_dir: Path, size: str = "tiny", seed: int = 0, progress: bool = True, **overrides: Any) -> Path:
    """Write a random-weight MedGemma checkpoint folder (config, safetensors, tokenizer, processor; a text-only
    size has no vision tower and no image processor files)."""
    from convert.registry import spec_from_config

    p = synth_params(size, **overrides)
    config = build_config(p)
    spec_from_config(config, f"synthetic {size} config")  # refuse shapes the runtime cannot run
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder; choose another output folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: folder exists and is not empty; choose a new folder or delete it")
    try:
        with publishing_dir(out_dir) as tmp:
            _write_checkpoint(tmp, p, config, size, seed, progress)
    except FileExistsError as exc:
        raise UserError(f"{out_dir}: appeared while synthesizing; choose a new folder") from exc
    log.info("wrote synthetic %s checkpoint (random weights) to %s", size, out_dir)
    return out_dir


def _write_checkpoint(tmp: Path, p: dict[str, Any], config: dict[str, Any], size: str, seed: int,
                      progress: bool) -> None:
    from convert.synth.tokenizer_files import write_tokenizer_files

    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 2, "cache_implementation": "hybrid", "do_sample": False,
         "eos_token_id": [1, 106], "pad_token_id": 0, "transformers_version": "4.50.0.dev0"}, indent=2) + "\n")
    write_tokenizer_files(tmp, tokens_per_image=p["mm_tokens_per_image"], image_size=p["image_size"],
                          vision=not p["text_only"])

    plan = tensor_plan(p)
    rng = np.random.default_rng(seed)
    shards = _shards(plan, SHARD_BYTES)
    total = sum(2 * math.prod(t.shape) for t in plan)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"synth {size}", disable=not progress) as bar:
        emit = lambda t: _chunks(t, rng, p["init"])  # noqa: E731 - one shared RNG stream, in order
        if len(shards) == 1:
            _write_safetensors(tmp / "model.safetensors", plan, emit, bar)
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / name, shard, emit, bar)
                weight_map.update({t.name: name for t in shard})
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
