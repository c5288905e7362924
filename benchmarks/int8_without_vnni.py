"""Is each int8 image encoder of a bundle the same on an x86 CPU without VNNI? (`qemu-x86_64 -cpu Haswell`)

    .venv/bin/python benchmarks/int8_without_vnni.py --bundle BUNDLE [--out DIR]

Without VNNI (AVX2 only, or AVX-512 before Cascade Lake), ONNX Runtime's u8 x s8 GEMM kernel (vpmaddubsw)
adds pairs of products in int16, which saturates when 2 * 255 * |w| > 32767: full 8-bit weights break it, so
there the runtime's sessions ask for ONNX Runtime's exact u8 x u8 kernels (`make_session`). This runs every
ONNX int8 encoder of the bundle on this CPU and, through qemu's user-mode emulator, on a Haswell (AVX2, FMA,
no AVX-512, no VNNI), each as the runtime chooses and with the u8 x s8 kernel forced (the control), and
compares each with the bundle's onnx:fp32 encoder on the same CPU (worst-token cosine, max |diff|) on two
sample films. Needs `qemu-user` (Debian: apt-get install qemu-user); emulation is slow: use a tiny bundle.
Writes int8-without-vnni.{json,md} under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from convert.fidelity.metrics import compare
from convert.writers.onnx_vision import INPUT
from medgemma_edge.backends.cpu import u8s8_saturates
from medgemma_edge.backends.onnx.session import make_session
from medgemma_edge.bundle import open_bundle
from medgemma_edge.inputs.images import normalise, resize_square
from medgemma_edge.inputs.samples import sample_image
from medgemma_edge.measure.hardware import fingerprint
from medgemma_edge.versions import package_version

EMULATED = "Haswell"
MODES = {"runtime's choice": None, "u8 x s8 forced": False}


def features(paths: dict[str, str], size: int, mean: list[float], std: list[float]) -> dict[str, list]:
    """Each graph's features for the two sample films in each mode, on the CPU this process runs on."""
    with tempfile.TemporaryDirectory() as tmp:
        films = [resize_square(str(sample_image(Path(tmp) / f"film{s}.png", seed=s)), size) for s in (0, 1)]
    pixels = normalise(np.stack(films), mean, std)
    return {f"{name} ({mode})": make_session(Path(p), ["CPUExecutionProvider"], 1, level="EXTENDED",
                                             exact_int8=exact).run(None, {INPUT: pixels})[0].tolist()
            for name, p in paths.items() for mode, exact in MODES.items() if name != "onnx:fp32" or exact is None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/int8-without-vnni"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # JSON args: compute features, print them
    args = ap.parse_args()
    bundle = open_bundle(args.bundle)
    v = bundle.config["vision"]
    if args.child:
        print(json.dumps(features(json.loads(args.child), int(v["image_size"]), v.get("image_mean", [0.5] * 3),
                                  v.get("image_std", [0.5] * 3))))
        return 0
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        sys.exit("int8_without_vnni: qemu-x86_64 not found: apt-get install qemu-user")
    paths = {a.id: str(bundle.path(a)) for a in bundle.artifacts
             if a.kind == "encoder" and a.format == "onnx" and a.precision in ("fp32", "int8", "int8_static")}
    if "onnx:fp32" not in paths:
        sys.exit(f"int8_without_vnni: {args.bundle} has no onnx:fp32 encoder to compare with: convert with "
                 f"--onnx-vision fp32,int8")
    runs: dict[str, Any] = {}
    for cpu, prefix in (("this CPU", []), (f"emulated {EMULATED}", [qemu, "-cpu", EMULATED])):
        cmd = [*prefix, sys.executable, __file__, "--bundle", str(args.bundle), "--child", json.dumps(paths)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True)
        feats = {k: np.asarray(v) for k, v in json.loads(done.stdout.splitlines()[-1]).items()}
        fp32 = feats.pop(f"onnx:fp32 ({next(iter(MODES))})")
        runs[cpu] = {k: compare(fp32, v) for k, v in feats.items()}
    rows = [f"| {name} | " + " | ".join(f"{runs[cpu][name]['cosine_min']:.6f} / {runs[cpu][name]['max_abs']:.3f}"
                                         for cpu in runs) + " |" for name in runs["this CPU"]]
    args.out.mkdir(parents=True, exist_ok=True)
    cpu, ort = fingerprint()["cpu"], package_version("onnxruntime")
    (args.out / "int8-without-vnni.json").write_text(json.dumps({"bundle": str(args.bundle), "cpu": cpu,
                                                                 "onnxruntime": ort, "runs": runs}, indent=1))
    vnni = not u8s8_saturates(str(cpu.get("arch") or ""), None, set(cpu.get("flags") or []))
    md = [f"this CPU: {cpu.get('model')} ({'VNNI' if vnni else 'no VNNI'}); "
          f"emulated: `qemu-x86_64 -cpu {EMULATED}`; onnxruntime {ort}\n",
          "| encoder vs onnx:fp32 (worst-token cosine / max abs diff) | " + " | ".join(runs) + " |",
          "|---|" + "---|" * len(runs), *rows]
    (args.out / "int8-without-vnni.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
