"""Issue 13's image-span prefill: one 256-row embedding span after a 14-token prefix, then 16 one-token steps.

    .venv/bin/python benchmarks/decoder_span_rounds.py BUNDLE [--decoders onnx:int4,gguf:q4_0,path:FILE.onnx]
        [--rounds 3] [--reps 3] [--threads 2] [--out DIR]

Each (round, decoder) is a fresh process and the order rotates every round. A decoder is a bundle artifact id, or
`path:FILE` for an ONNX decoder file outside the bundle (run with the bundle's config). In each process the span is
evaluated `--reps` times from a reset context (random embeddings: the values do not change the work); the first
rep warms up and is dropped. Prints and writes DIR/span-rounds.json and span-rounds.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SPAN, PREFIX, STEPS = 256, list(range(2, 16)), 16


def worker(bundle: str, decoder: str, reps: int, threads: int) -> dict[str, list[float]]:
    if decoder.startswith("path:"):
        from medgemma_edge.backends.onnx.decoder import OnnxDecoderModel
        from medgemma_edge.bundle import open_bundle

        dec = OnnxDecoderModel(Path(decoder[5:]), open_bundle(bundle).config, n_threads=threads).new_context(4096)
    else:
        from medgemma_edge.runtime.loader import load

        dec = load(bundle, decoder=decoder, text_only=True, n_threads=threads, verify=False).new_cache().decoder
    embd = np.random.default_rng(0).normal(0, 1, (SPAN, dec.n_embd)).astype(np.float32)
    span, decode = [], []
    for _ in range(reps):
        dec.reset()
        dec.eval_tokens(PREFIX)
        t = time.perf_counter()
        dec.eval_embeddings(embd)
        span.append(SPAN / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(STEPS):
            dec.eval_tokens([100 + i])
        decode.append(STEPS / (time.perf_counter() - t))
    return {"span_tok_s": span[1:], "decode_tok_s": decode[1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--decoders", default="onnx:int4,gguf:q4_0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="per process; the first is dropped (at least 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("span-rounds"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.bundle, args.worker, max(2, args.reps), args.threads)))
        return
    names = args.decoders.split(",")
    rows: dict[str, dict[str, list[float]]] = {d: {"span_tok_s": [], "decode_tok_s": []} for d in names}
    for rnd in range(args.rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            out = subprocess.run([sys.executable, __file__, args.bundle, "--worker", name, "--reps", str(args.reps),
                                  "--threads", str(args.threads)], check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            for key, values in res.items():
                rows[name][key] += values
            print(rnd, name, res, file=sys.stderr, flush=True)

    def mean_sd(v: list[float]) -> str:
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "span-rounds.json").write_text(json.dumps({"span": SPAN, "prefix": len(PREFIX), "steps": STEPS,
                                                           "threads": args.threads, "runs": rows}, indent=1) + "\n")
    lines = [f"# image-span rounds: {SPAN} embeddings after {len(PREFIX)} tokens, then {STEPS} one-token steps, "
             f"{args.threads} threads", "", "| decoder | samples | span prefill tok/s | decode tok/s |", "|---|---|---|---|"]
    lines += [f"| {name} | {len(r['span_tok_s'])} | {mean_sd(r['span_tok_s'])} | {mean_sd(r['decode_tok_s'])} |"
              for name, r in rows.items()]
    (args.out / "span-rounds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
