"""Decode of our ONNX int4 decoder and onnxruntime-genai's int4 build in one process, alternating.

    /opt/genai-venv/bin/python benchmarks/decoder_genai_inprocess.py BUNDLE GENAI_DIR [--decoder onnx:int4]
        [--rounds 6] [--prompt 303] [--new-tokens 32] [--threads 2] [--out DIR]

decoder_text_rounds.py runs each side in a fresh process; on a shared 2-core machine whose memory bandwidth drifts
from minute to minute, one process can land in a slow minute and its neighbour in a fast one. Here both models
are loaded side by side in onnxruntime-genai's environment (one onnxruntime library for both; this repository is
put on sys.path, so the environment needs numpy and pillow besides onnxruntime-genai), and each round times one
answer from each, the order swapped every round: genai's own generator loop (append_tokens, then
generate_next_token, the first step dropped, as ortgenai_baseline.py) against our decoder context (the prompt,
then greedy one-token steps). Same random prompt ids (token values do not change the work). Writes
genai-inprocess.json and genai-inprocess.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("genai", type=Path, help="onnxruntime-genai's int4 build of the same checkpoint")
    ap.add_argument("--decoder", default="onnx:int4")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=303)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("genai-inprocess"))
    args = ap.parse_args()

    import numpy as np
    import onnxruntime_genai as og

    sys.path.insert(0, str(REPO))
    from medgemma_edge.backends.onnx.decoder import OnnxDecoderModel
    from medgemma_edge.bundle import open_bundle

    bundle = open_bundle(args.bundle)
    artifact = next(a for a in bundle.artifacts if a.kind == "decoder" and a.id == args.decoder)
    ours = OnnxDecoderModel(bundle.path(artifact), bundle.config, n_threads=args.threads)
    config = og.Config(str(args.genai))
    config.clear_providers()  # the CPU provider
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    genai = og.Model(config)
    ids = [2, *np.random.default_rng(0).integers(1000, 200_000, args.prompt - 1).tolist()]

    def run_genai() -> float:
        params = og.GeneratorParams(genai)
        # the windowed KV cache needs max_length >= sliding_window (genai refuses smaller)
        params.set_search_options(max_length=max(len(ids) + args.new_tokens + 1, 1100), do_sample=False, batch_size=1)
        gen = og.Generator(genai, params)
        gen.append_tokens(np.asarray(ids, np.int32))
        steps = []
        for _ in range(args.new_tokens):
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t)
        return (len(steps) - 1) / sum(steps[1:])

    def run_ours() -> float:
        context = ours.new_context(len(ids) + args.new_tokens + 1)
        token = int(context.eval_tokens(ids)[-1].argmax())
        steps = []
        for _ in range(args.new_tokens):
            t = time.perf_counter()
            token = int(context.eval_tokens([token])[-1].argmax())
            steps.append(time.perf_counter() - t)
        return (len(steps) - 1) / sum(steps[1:])

    runners = {args.decoder: run_ours, "onnxruntime-genai:int4": run_genai}
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        rounds.append({name: runners[name]() for name in order})
        print(r, {k: round(v, 2) for k, v in rounds[-1].items()}, flush=True)
    ratios = [x[args.decoder] / x["onnxruntime-genai:int4"] for x in rounds]
    summary = {name: {"mean": statistics.mean(x[name] for x in rounds), "sd": statistics.stdev(x[name] for x in rounds)}
               for name in runners}
    doc = {"prompt": args.prompt, "new_tokens": args.new_tokens, "threads": args.threads, "rounds": rounds,
           "decode_tok_s": summary, "ratio": {"per_round": ratios, "mean": statistics.mean(ratios),
                                              "min": min(ratios), "max": max(ratios)}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "genai-inprocess.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# decode in one process, alternating: {args.prompt}-position prompt, {args.new_tokens} new tokens, "
             f"{args.threads} threads, {args.rounds} rounds", "", "| runner | decode tok/s |", "|---|---|"]
    lines += [f"| {name} | {s['mean']:.2f} ± {s['sd']:.2f} |" for name, s in summary.items()]
    lines += ["", f"{args.decoder} / onnxruntime-genai per round: mean {statistics.mean(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})"]
    (args.out / "genai-inprocess.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
