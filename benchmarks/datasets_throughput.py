"""Issue 16's throughput benchmark: `medgemma-edge batch` over a synthetic cohort, items per hour.

    .venv/bin/python benchmarks/datasets_throughput.py [--bundle B] [--items 24] [--threads 2] [--out DIR]

Four runs over the same items, each a fresh `batch` process (its model load included, as a user's run):
1. local engine, cold embedding cache (a new --cache-dir): every image is encoded;
2. local engine, warm cache (the same --cache-dir): nothing is encoded;
3. Ray on this one node (`--engine ray`, a Ray instance the driver starts, one actor with --threads CPUs), warm
   cache: its overhead against run 2, as a share of run 2's wall time (issue 16's target: at most 5%);
4. the cohort again with another decoder, warm cache: encode time per image ~0 (the cache is keyed by the encoder).
`--local-again` adds a second local warm run after Ray's (Ray is then compared with the mean of the two);
`--no-other-decoder` skips run 4.
Items are distinct synthetic 896x896 chest-film-like images (random, so no two share pixels), one question each.

Default bundle: the standard suite's full-size synthetic 4B (.cache/bench-suite/bundle4b, benchmarks/suite.py),
made here when missing (synth 4b, convert q4_k_m + q8_0 + ONNX int8 vision). `--bundle` takes any bundle (the
tiny one, to check the script). Results: DIR/throughput.json and throughput.md (default
benchmarks/results/<hardware>-4b/datasets/). The per-item JSONL files stay in DIR/runs/ (delete before committing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("medgemma-edge"))
PROMPT = "Describe the findings in this chest X-ray."


def sh(*args: str | Path) -> None:
    print("+", " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run([*map(str, args)], check=True)


def cohort(folder: Path, n: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        path = folder / f"film{i:04d}.png"
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        lungs = np.exp(-(((xx - 0.33) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + \
            np.exp(-(((xx - 0.67) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
        gray = np.clip(200 - 150 * lungs + rng.normal(0, 12, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(np.stack([gray] * 3, -1)).save(path)
    return folder


def cpu_seconds_of_others() -> float:
    """CPU seconds all processes but ours have used since boot (/proc/stat minus our children's): a busy flag."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    total = sum(int(f) for i, f in enumerate(fields) if i not in (3, 4)) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    mine = os.times()
    return total - (mine.children_user + mine.children_system + mine.user + mine.system)


def run_batch(name: str, out: Path, args: list[str]) -> dict[str, Any]:
    results, summary = out / "runs" / f"{name}.jsonl", out / "runs" / f"{name}.summary.json"
    results.unlink(missing_ok=True)
    others0, t0 = cpu_seconds_of_others(), time.perf_counter()
    sh(CLI, "batch", *args, "--output", results, "--summary-json", summary, "--no-progress")
    process_s = time.perf_counter() - t0
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    ok = [r for r in lines if r["status"] == "ok"]
    s = json.loads(summary.read_text())

    def mean(key: str) -> float | None:
        values = [r["timings"][key] for r in ok if key in r["timings"]]
        return statistics.fmean(values) if values else None

    return {"run": name, "items": len(lines), "failed": len(lines) - len(ok), "wall_s": s["wall_s"],
            "process_s": process_s, "load_s": s["load_s"], "items_per_hour": s["items_per_hour"],
            "items_per_hour_process": len(lines) / process_s * 3600,
            "item_s_mean": statistics.fmean(r["item_s"] for r in ok) if ok else None,
            "item_s_median": statistics.median(r["item_s"] for r in ok) if ok else None,  # the first is llama.cpp's warm-up
            "image_encode_ms_mean": mean("image_encode_ms"), "ttft_ms_mean": mean("time_to_first_token_ms"),
            "decode_tokens_per_s_mean": mean("decode_tokens_per_s"),
            "other_procs_cores": (cpu_seconds_of_others() - others0) / process_s,
            "answers": {r["id"]: r["answer"] for r in ok}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-suite", help="checkpoint + bundle folder")
    ap.add_argument("--bundle", type=Path, default=None, help="default: WORK/bundle4b (made when missing)")
    ap.add_argument("--encoder", default="onnx:int8")
    ap.add_argument("--decoder", default="gguf:q4_k_m")
    ap.add_argument("--other-decoder", default="gguf:q8_0")
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--image-size", type=int, default=896)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-ray", action="store_true", help="skip run 3 (no `cluster` extra)")
    ap.add_argument("--no-other-decoder", action="store_true", help="skip run 4")
    ap.add_argument("--local-again", action="store_true",
                    help="a second local warm run after Ray's; Ray is then compared with the mean of the two")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from medgemma_edge.measure.hardware import fingerprint, slug

    bundle = args.bundle or args.work / "bundle4b"
    if args.bundle is None and not (bundle / "manifest.json").is_file():
        ckpt = args.work / "ckpt4b"
        if not (ckpt / "config.json").is_file():
            sh(CLI, "synth", ckpt, "--size", "4b")
        sh(CLI, "convert", ckpt, "-o", bundle, "--gguf", "q4_k_m,q8_0", "--mmproj", "f16", "--onnx-vision", "int8")
    fp = fingerprint()
    out = args.out or REPO / "benchmarks" / "results" / f"{slug(fp)}-4b" / "datasets"
    images = cohort(out / "runs" / "cohort", args.items, args.image_size)
    cache = out / "runs" / "cache"
    if cache.exists():
        import shutil

        shutil.rmtree(cache)  # run 1 must start cold
    base = ["--bundle", bundle, "--input", images, "--prompt", PROMPT, "--encoder", args.encoder,
            "--max-new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--cache-dir", cache]
    runs = [run_batch("local-cold", out, [*base, "--decoder", args.decoder]),
            run_batch("local-warm", out, [*base, "--decoder", args.decoder])]
    if not args.no_ray:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        runs.append(run_batch("ray-one-node-warm", out, [*base, "--decoder", args.decoder, "--engine", "ray",
                                                          "--workers", "1", "--cpus-per-worker", str(args.threads)]))
    if args.local_again:  # brackets the Ray run, so a drift of the machine shows as a gap between the two
        runs.append(run_batch("local-warm-2", out, [*base, "--decoder", args.decoder]))
    if not args.no_other_decoder:
        runs.append(run_batch("other-decoder-warm", out, [*base, "--decoder", args.other_decoder]))
    by = {r["run"]: r for r in runs}
    report: dict[str, Any] = {"bundle": str(bundle), "encoder": args.encoder, "decoder": args.decoder,
                              "other_decoder": None if args.no_other_decoder else args.other_decoder,
                              "items": args.items, "new_tokens": args.new_tokens, "threads": args.threads,
                              "hardware": fp, "runs": runs}
    cold, warm = by["local-cold"], by["local-warm"]
    report["warm_answers_equal_cold"] = cold["answers"] == warm["answers"]
    if "ray-one-node-warm" in by:
        ray = by["ray-one-node-warm"]
        local = [r for r in (warm, by.get("local-warm-2")) if r is not None]
        local_s = statistics.fmean(r["process_s"] for r in local)
        local_item_s = statistics.fmean(r["item_s_mean"] or 0 for r in local)
        report["ray_overhead_share_of_wall"] = (ray["process_s"] - local_s) / local_s
        report["ray_overhead_per_item_s"] = (ray["item_s_mean"] or 0) - local_item_s
        report["ray_answers_equal_local"] = ray["answers"] == warm["answers"]
    if "local-warm-2" in by:
        report["local_runs_apart"] = (by["local-warm-2"]["process_s"] - warm["process_s"]) / warm["process_s"]
    for r in runs:
        r.pop("answers")
    (out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "throughput.md").write_text(markdown(report))
    print(markdown(report))


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    cpu = report["hardware"].get("cpu", {}).get("model", "?")
    lines = [f"# batch throughput: {report['items']} items, {report['encoder']} + {report['decoder']}, "
             f"{report['new_tokens']} new tokens, {report['threads']} threads", "",
             f"{cpu}. Each run is a fresh `medgemma-edge batch` process (model load included).", "",
             "| run | items/hour (process) | items/hour (batch wall) | process s | load s | per item s (mean, median) | "
             "image encode ms | TTFT ms | decode tok/s | other procs (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['run']} | {_f(r['items_per_hour_process'])} | {_f(r['items_per_hour'])} | "
                     f"{_f(r['process_s'])} | {_f(r['load_s'], 2)} | {_f(r['item_s_mean'], 2)}, {_f(r['item_s_median'], 2)} | "
                     f"{_f(r['image_encode_ms_mean'])} | {_f(r['ttft_ms_mean'])} | "
                     f"{_f(r['decode_tokens_per_s_mean'])} | {_f(r['other_procs_cores'], 2)} |")
    lines.append("")
    lines.append(f"- warm-cache answers equal cold: {report['warm_answers_equal_cold']}")
    if "ray_overhead_share_of_wall" in report:
        lines.append(f"- Ray on one node vs local (warm): {100 * report['ray_overhead_share_of_wall']:+.1f}% of wall "
                     f"time (target <= 5%), {report['ray_overhead_per_item_s']:+.3f} s per item; same answers: "
                     f"{report['ray_answers_equal_local']}")
    if "local_runs_apart" in report:
        lines.append(f"- Ray compared with the mean of the two local warm runs, which are "
                     f"{100 * report['local_runs_apart']:+.1f}% apart")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
