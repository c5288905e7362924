"""Issue 12's study benchmark: a synthetic CT series through full-size synthetic MedGemma 4B, 1/4/16/85 slices.

    .venv/bin/python benchmarks/study_suite.py [--reps 1 --warmup 0 --threads 2]

1. reuses the standard suite's 4B bundle (.cache/bench-suite/bundle4b, from benchmarks/suite.py) or makes a
   smaller one: `synth --size 4b`, then `convert` with Q4_K_M, mmproj F16 and ONNX int8 vision only;
2. writes a synthetic CT phantom series of 120 axial 512x512 slices (medgemma_edge/inputs/sample_series.py),
   so 85 are sampled out of more, as the CT notebook does on a real series;
3. `medgemma-edge bench --study` over the composed path (onnx:int8+gguf:q4_k_m) and llama.cpp's own path
   (llama.cpp:f16+q4_k_m) in the same rounds, at 1, 4, 16 and 85 slices;
4. results to benchmarks/results/<hardware>-4b/study/ (bench.json, bench.md, bench-scaling.png).

Expected on the 2-core machine of results/amd-epyc-2c-4b (int8 encode 9.6 s/image, mtmd F16 25 s/image,
image prefill ~70 tokens/s): one round of 1+4+16+85 = 106 slices takes ~25 min composed and ~53 min on
llama.cpp's path, so ~1.3 h for --reps 1 --warmup 0 (each extra round ~1.3 h more), plus ~10 min to
convert when no suite bundle exists. Peak RAM ~8 GB (85 slices: ~23.6K context, KV cache ~3.3 GB with
llama.cpp's swa_full, which our decoder sets).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = [str(Path(sys.executable).with_name("medgemma-edge"))]
COMBOS = "onnx:int8+gguf:q4_k_m,llama.cpp:f16+q4_k_m"
NOTE = ("SYNTHETIC random weights in MedGemma 4B's exact shapes and a synthetic CT phantom series: speed and "
        "memory are real, answers are not")


def sh(*args: str | Path) -> None:
    print("+", " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run([*map(str, args)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-suite", help="checkpoint + bundle folder")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--scaling", default="1,4,16,85")
    ap.add_argument("--combos", default=COMBOS, help="bench's combinations (e.g. the composed path alone at 85 slices)")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<hardware>-4b/study")
    args = ap.parse_args()

    from medgemma_edge.inputs.sample_series import write_series
    from medgemma_edge.measure.hardware import fingerprint, slug

    ckpt, bundle = args.work / "ckpt4b", args.work / "bundle4b"
    if not (bundle / "manifest.json").is_file():
        if not (ckpt / "config.json").is_file():
            sh(*CLI, "synth", ckpt, "--size", "4b")
        sh(*CLI, "convert", ckpt, "-o", bundle, "--gguf", "q4_k_m", "--mmproj", "f16", "--onnx-vision", "int8")
    series = args.work / "ct-phantom-120"
    if not series.is_dir():
        write_series(series, 120, size=512, seed=0)
    out = args.out or REPO / "benchmarks" / "results" / f"{slug(fingerprint())}-4b" / "study"
    sh(*CLI, "bench", "--bundle", bundle, "--study", series, "--scaling", args.scaling, "--combos", args.combos,
       "--reps", str(args.reps), "--warmup", str(args.warmup), "--new-tokens", str(args.new_tokens),
       "--threads", str(args.threads), "--note", NOTE, "--out", out)
    print(f"results in {out} (the rendered slices are in {out / 'inputs'}: not results, delete before committing)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
