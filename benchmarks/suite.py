"""The standard benchmark suite: full-size synthetic MedGemma 4B, every precision, on the machine at hand.

    make bench-suite            # or: .venv/bin/python benchmarks/suite.py [--reps 3 --warmup 1 --validate]

1. `medgemma-edge synth --size 4b` (random weights in the published layout: speed does not depend on values);
2. `medgemma-edge convert` with every precision the suite compares;
3. `medgemma-edge bench` over the combinations below, llama.cpp's own path and transformers fp32 included,
   with 1/2/4-image scaling;
4. optionally `medgemma-edge validate` against the checkpoint;
5. results copied to benchmarks/results/<hardware>/ (JSON, markdown, PNG).

Needs ~45 GB of disk under --work and ~21 GB of RAM (the transformers fp32 baseline). On 2 cores: synth ~1 min,
convert ~16 min, bench ~36 min, validate ~10 min (measured on the machine in results/amd-epyc-2c-4b,
before Q4_0 and the ONNX int4 decoder joined the suite: they add two conversions and two combinations).
Steps 1-2 are skipped when their output exists, so a re-run only re-measures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLI = [str(Path(sys.executable).with_name("medgemma-edge"))]
# Not in the suite: ONNX fp16 vision (a GPU precision; ORT's CPU kernels are fp32/int8) and int8_static (it needs
# calibration images; measured apart, slower than dynamic int8 on CPU: benchmarks/README.md).
CONVERT = ["--gguf", "q4_k_m,q8_0,q4_0", "--mmproj", "f16,q8_0", "--onnx-vision", "fp32,int8", "--onnx-decoder", "int4,int4_b128"]
COMBOS = ("llama.cpp:f16+q4_k_m,gguf:f16+gguf:q4_k_m,onnx:int8+gguf:q4_k_m,onnx:fp32+gguf:q4_k_m,"
          "gguf:q8_0+gguf:q4_k_m,onnx:int8+gguf:q8_0,onnx:int8+gguf:q4_0,onnx:int8+onnx:int4,onnx:int8+onnx:int4_b128,transformers:fp32")
SCALING_COMBOS = "llama.cpp:f16+q4_k_m,onnx:int8+gguf:q4_k_m"
NOTE = "SYNTHETIC random weights in MedGemma 4B's exact shapes: speed and memory are real, answers are not"


def sh(*args: str | Path, check: bool = True) -> int:
    print("+", " ".join(map(str, args)), file=sys.stderr, flush=True)
    return subprocess.run([*map(str, args)], check=check).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-suite", help="checkpoint + bundle folder")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    # one figure for every backend: llama.cpp's and mtmd's own defaults (4) oversubscribe a 2-core machine
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for every backend (default: every core)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--validate", action="store_true", help="also run `validate` on the 4B bundle (~20 GB RAM)")
    args = ap.parse_args()

    from medgemma_edge.measure.hardware import fingerprint, slug

    ckpt, bundle = args.work / "ckpt4b", args.work / "bundle4b"
    if not (ckpt / "config.json").is_file():
        sh(*CLI, "synth", ckpt, "--size", "4b")
    if not (bundle / "manifest.json").is_file():
        sh(*CLI, "convert", ckpt, "-o", bundle, *CONVERT)
    out = REPO / "benchmarks" / "results" / f"{slug(fingerprint())}-4b"
    sh(*CLI, "bench", "--bundle", bundle, "--combos", COMBOS, "--scaling", "1,2,4", "--scaling-combos",
       SCALING_COMBOS, "--reference", ckpt, "--reps", str(args.reps), "--warmup", str(args.warmup),
       "--new-tokens", str(args.new_tokens), "--note", NOTE, "--out", out, "--threads", str(args.threads))
    shutil.rmtree(out / "inputs", ignore_errors=True)  # regenerated synthetic images: not results
    if args.validate:
        # exit 4 (a bound missed) still leaves a report worth keeping next to the timings
        if sh(*CLI, "validate", "--bundle", bundle, "--reference", ckpt, "--max-new-tokens", "4", check=False) not in (0, 4):
            sys.exit("validate failed before writing a report")
        latest = max((bundle / "validation").iterdir())
        shutil.copytree(latest, out / "validation", dirs_exist_ok=True)
    print(f"results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
