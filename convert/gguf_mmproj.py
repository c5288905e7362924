"""SigLIP vision tower + Gemma 3 projector -> mmproj GGUF (architecture `clip`, projector `gemma3`)."""

from __future__ import annotations

from pathlib import Path

import gguf

from convert.checkpoint import Checkpoint, iter_layers, read_json
from convert.gguf_common import Q, TensorJob, add_one, write_gguf
from convert.spec import MedGemmaSpec
from medgemma_edge.errors import UserError


# canonical checkpoint name -> mmproj tensor (names from llama.cpp tools/mtmd/clip-impl.h).
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

MMPROJ_PRECISIONS: dict[str, gguf.GGMLQuantizationType] = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def tensor_type(dst: str, shape: tuple[int, ...], precision: str) -> gguf.GGMLQuantizationType:
    """Storage type of one mmproj tensor under a precision policy.

    Embeddings and 1-D tensors stay F32 (ref: llama.cpp Gemma3VisionModel.tensor_force_quant);
    the input projection is never quantized (ref: llama.cpp issue 13025: mtmd transposes it);
    Q8_0 needs rows that are a multiple of 32, so SigLIP's 4304-wide FFN falls back to F16.
    """
    want = MMPROJ_PRECISIONS[precision]
    if want == Q.F32 or len(shape) < 2 or dst.startswith(("v.patch_embd", "v.position_embd")):
        return Q.F32
    if dst == "mm.input_projection.weight":
        return Q.F16
    block = gguf.GGML_QUANT_SIZES[want][0]
    return want if shape[-1] % block == 0 else Q.F16


def mmproj_jobs(ckpt: Checkpoint, spec: MedGemmaSpec, precision: str) -> list[TensorJob]:
    names = set(ckpt.names("vision")) | set(ckpt.names("projector"))
    layers = list(iter_layers([n[len("vision."):] for n in names if n.startswith("vision.")], "encoder.layers"))
    if layers != list(range(spec.vision.num_layers)):
        raise UserError(f"{ckpt.dir}: vision tower has {len(layers)} layers, config says {spec.vision.num_layers}")
    jobs: list[TensorJob] = []
    for src_t, dst_t in MMPROJ_TENSORS.items():
        for bid in layers if "{bid}" in src_t else [None]:
            src, dst = src_t.format(bid=bid), dst_t.format(bid=bid)
            if not ckpt.has(src):
                raise UserError(f"{ckpt.dir}: tensor {src!r} is missing; the checkpoint is incomplete")
            # only the projector's soft-embedding norm is a Gemma RMSNorm; SigLIP LayerNorms are plain
            transform = add_one if src == "projector.mm_soft_emb_norm.weight" else None
            jobs.append(TensorJob(src, dst, tensor_type(dst, ckpt.shape(src), precision), transform))
    extra = sorted(names - {j.src for j in jobs})
    if extra:
        raise UserError(f"{ckpt.dir}: vision tensor {extra[0]!r} has no mmproj mapping; unsupported checkpoint variant")
    return jobs


def write_mmproj(ckpt: Checkpoint, spec: MedGemmaSpec, out: Path, precision: str, progress: bool = True) -> None:
    v = spec.vision
    w = gguf.GGUFWriter(path=None, arch="clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name("MedGemma vision encoder (SigLIP + Gemma 3 projector)")
    w.add_file_type(int(_FILE_TYPE[precision]))
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    w.add_vision_projection_dim(spec.text.hidden_size)
    w.add_vision_image_size(v.image_size)
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.hidden_size)
    w.add_vision_feed_forward_length(v.intermediate_size)
    w.add_vision_block_count(v.num_layers)
    w.add_vision_head_count(v.num_heads)
    w.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    mean, std = _image_norm(ckpt.dir)
    w.add_vision_image_mean(mean)
    w.add_vision_image_std(std)
    w.add_vision_use_gelu(True)
    # mtmd assumes 4 unless told; always recording it keeps other shapes honest
    w.add_vision_projector_scale_factor(spec.pool_factor)
    write_gguf(out, w, ckpt, mmproj_jobs(ckpt, spec, precision), f"mmproj {precision}", progress)


def _image_norm(ckpt_dir: Path) -> tuple[list[float], list[float]]:
    """Normalisation constants from preprocessor_config.json (Gemma 3 default: 0.5 / 0.5)."""
    cfg = read_json(ckpt_dir / "preprocessor_config.json")
    return list(cfg.get("image_mean", [0.5] * 3)), list(cfg.get("image_std", [0.5] * 3))
