"""Issue 13's text-only rounds: our decoders beside onnxruntime-genai's own int4 build, same prompt length, alternating.

    .venv/bin/python benchmarks/decoder_text_rounds.py BUNDLE --genai GENAI_DIR [--decoders onnx:int4,gguf:q4_0,gguf:q4_k_m]
        [--genai-python /opt/genai-venv/bin/python] [--rounds 3] [--new-tokens 32] [--threads 2] [--out DIR]

Each (round, runner) is a fresh process; the order rotates every round. Ours: `load(text_only=True)`, one chat
question of ~284 positions (the length of the suite's one-image prompt), greedy, exactly --new-tokens tokens; our
runtime's own prefill and decode figures. onnxruntime-genai: benchmarks/ortgenai_baseline.py `run` in its own
environment with random ids of the same length (token values do not change the work). Writes text-rounds.json and
text-rounds.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# ~280 positions once the chat template is around it: what the work is, not what it says, matters here
PROMPT = "Summarise the following findings for the referring physician. " + " ".join(
    f"Finding {i}: a small nodular opacity in segment {i % 10}, unchanged from the prior film." for i in range(14))


def ours(bundle: str, decoder: str, new_tokens: int, threads: int) -> dict[str, Any]:
    from medgemma_edge.runtime.generate import generate
    from medgemma_edge.runtime.loader import load
    from medgemma_edge.runtime.sampling import SamplingParams

    with load(bundle, decoder=decoder, text_only=True, n_threads=threads, verify=False) as pipe:
        r = generate(pipe, PROMPT, sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    t = r.timings
    return {"prompt_tokens": r.prompt_tokens, "prefill_tok_s": t["prefill_tokens_per_s"],
            "ttft_s": t["time_to_first_token_ms"] / 1000, "decode_tok_s": t["decode_tokens_per_s"]}


def genai(python: str, model: Path, prompt_len: int, new_tokens: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "genai.json"
        subprocess.run([python, str(REPO / "benchmarks" / "ortgenai_baseline.py"), "run", str(model), "--prompt-len",
                        str(prompt_len), "--new-tokens", str(new_tokens), "--threads", str(threads), "--warmup", "0",
                        "--rounds", "1", "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
        r = json.loads(out.read_text())["rounds"][0]
    return {k: r[k] for k in ("prompt_tokens", "prefill_tok_s", "ttft_s", "decode_tok_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--genai", type=Path, required=True, help="onnxruntime-genai's int4 build of the same checkpoint")
    ap.add_argument("--genai-python", default="/opt/genai-venv/bin/python")
    ap.add_argument("--decoders", default="onnx:int4,gguf:q4_0,gguf:q4_k_m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("text-rounds"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # one of our decoders, in this fresh process
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(ours(args.bundle, args.worker, args.new_tokens, args.threads)))
        return

    runners = [*args.decoders.split(","), "onnxruntime-genai:int4"]
    rows: dict[str, list[dict[str, Any]]] = {r: [] for r in runners}
    prompt_len = 0
    for rnd in range(args.rounds):
        for name in runners[rnd % len(runners):] + runners[:rnd % len(runners)]:
            if name.startswith("onnxruntime-genai"):  # last in round 0, so ours have set the length
                res = genai(args.genai_python, args.genai, prompt_len, args.new_tokens, args.threads)
            else:
                out = subprocess.run([sys.executable, __file__, args.bundle, "--genai", str(args.genai), "--worker", name,
                                      "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)],
                                     check=True, capture_output=True, text=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                prompt_len = prompt_len or res["prompt_tokens"]
            rows[name].append(res)
            print(rnd, name, res, file=sys.stderr, flush=True)

    def mean_sd(vals: list[float]) -> str:
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "text-rounds.json").write_text(json.dumps({"prompt_tokens": prompt_len, "new_tokens": args.new_tokens,
                                                           "threads": args.threads, "runs": rows}, indent=1) + "\n")
    lines = [f"# text-only rounds: {prompt_len}-position prompt, {args.new_tokens} new tokens, {args.threads} threads",
             "", "| runner | rounds | prefill tok/s | TTFT s | decode tok/s |", "|---|---|---|---|---|"]
    for name, rs in rows.items():
        if rs:
            lines.append(f"| {name} | {len(rs)} | {mean_sd([r['prefill_tok_s'] for r in rs])} | "
                         f"{mean_sd([r['ttft_s'] for r in rs])} | {mean_sd([r['decode_tok_s'] for r in rs])} |")
    (args.out / "text-rounds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
