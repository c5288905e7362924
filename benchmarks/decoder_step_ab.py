"""Two ONNX decoder graphs of one model, decode steps timed in alternating blocks in one process.

    .venv/bin/python benchmarks/decoder_step_ab.py BUNDLE A.onnx B.onnx [--prompt 300] [--blocks 12] [--steps 8]
        [--threads 2] [--json FILE]

For graph changes too small for fresh-process rounds to resolve (their decode spread is +-10% on a shared 2-core
machine): both sessions are loaded at once, each prefills the same random --prompt ids, then blocks of --steps
one-token steps alternate A, B / B, A from the same rolled-back position, so both see the same neighbours. The
first block pair warms up and is dropped. Prints ms per step for each and the per-block ratio A / B.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", help="the bundle whose config both graphs share")
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from medgemma_edge.backends.onnx.decoder import OnnxDecoderModel
    from medgemma_edge.bundle import open_bundle

    config = open_bundle(args.bundle).config
    contexts = {k: OnnxDecoderModel(p, config, n_threads=args.threads).new_context(args.prompt + args.steps + 256)
                for k, p in (("a", args.a), ("b", args.b))}
    ids = np.random.default_rng(0).integers(1000, 200000, args.prompt).tolist()
    for c in contexts.values():
        c.eval_tokens(ids)
    ms: dict[str, list[float]] = {"a": [], "b": []}
    for block in range(args.blocks):
        for k in ("a", "b") if block % 2 == 0 else ("b", "a"):
            c = contexts[k]
            c.truncate(args.prompt)
            t = time.perf_counter()
            for i in range(args.steps):
                c.eval_tokens([1000 + i])
            ms[k].append((time.perf_counter() - t) / args.steps * 1000)
    a, b = ms["a"][1:], ms["b"][1:]
    ratios = [x / y for x, y in zip(a, b)]
    doc = {"a": str(args.a), "b": str(args.b), "prompt": args.prompt, "steps": args.steps, "threads": args.threads,
           "ms_per_step": ms, "median_ms": {"a": statistics.median(a), "b": statistics.median(b)},
           "ratio_a_over_b": {"median": statistics.median(ratios), "per_block": ratios}}
    print(f"A {args.a}: {statistics.median(a):.1f} ms/step median; B {args.b}: {statistics.median(b):.1f}; "
          f"A / B per block: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
