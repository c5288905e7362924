"""SigLIP vision tower + Gemma 3 projector -> mmproj GGUF (architecture `clip`, projector `gemma3`)."""

from __future__ import annotations

from pathlib import Path

import gguf

from convert.checkpoint import Checkpoint, iter_layers
from convert.models.gemma3 import MMPROJ_TENSORS, MedGemmaSpec
from convert.writers.gguf_common import Q, TensorJob, add_one, write_gguf
from medgemma_edge.errors import UserError


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
    w.add_vision_image_mean(list(v.image_mean))
    w.add_vision_image_std(list(v.image_std))
    w.add_vision_use_gelu(True)
    # mtmd assumes 4 unless told; always recording it keeps other shapes honest
    w.add_vision_projector_scale_factor(spec.pool_factor)
    write_gguf(out, w, ckpt, mmproj_jobs(ckpt, spec, precision), f"mmproj {precision}", progress)
