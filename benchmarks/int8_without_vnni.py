"""Is each int8 image encoder of a bundle the same on an x86 CPU without VNNI? (`qemu-x86_64 -cpu Haswell`)

    .venv/bin/python benchmarks/int8_without_vnni.py --bundle BUNDLE [--full-range] [--out DIR]

Without VNNI (AVX2 only, or AVX-512 before Cascade Lake), ONNX Runtime's u8 x s8 GEMM kernel (vpmaddubsw)
adds pairs of products in int16, which saturates when 2 * 255 * |w| > 32767: full 8-bit weights break it,
7-bit weights (the converter's `weight_range`) cannot. This runs every ONNX int8 encoder of the bundle on this
CPU and, through qemu's user-mode emulator, on a Haswell (AVX2, FMA, no AVX-512, no VNNI), and compares each
with the bundle's onnx:fp32 encoder on the same CPU (worst-token cosine, max |diff|) on two sample films.
`--full-range` also quantizes the fp32 graph the way the converter did before 7-bit weights, as the control.
Needs `qemu-user` (Debian: apt-get install qemu-user); emulation is slow: use a tiny bundle.
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
from medgemma_edge.backends.onnx.vision import OnnxEncoder
from medgemma_edge.bundle import open_bundle
from medgemma_edge.inputs.images import resize_square
from medgemma_edge.inputs.samples import sample_image

EMULATED = "Haswell"


def features(paths: dict[str, str], size: int, n_embd: int, tokens: int) -> dict[str, list]:
    """Each graph's features for the two sample films, on the CPU this process runs on."""
    with tempfile.TemporaryDirectory() as tmp:
        films = [resize_square(str(sample_image(Path(tmp) / f"film{s}.png", seed=s)), size) for s in (0, 1)]
    images = np.stack(films)
    return {name: OnnxEncoder(Path(p), n_embd, tokens, n_threads=1).encode_batch(images).tolist()
            for name, p in paths.items()}


def full_range_control(fp32: Path, dst: Path) -> Path:
    """The fp32 graph quantized as before 7-bit weights: same options, full [-127, 127] weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from convert.writers.onnx_vision import typed_copy

    quantize_dynamic(typed_copy(fp32), dst, op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    return dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--full-range", action="store_true", help="also the pre-7-bit quantization, as a control")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/int8-without-vnni"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # JSON args: compute features, print them
    args = ap.parse_args()
    bundle = open_bundle(args.bundle)
    n_embd, tokens = int(bundle.config["text"]["hidden_size"]), int(bundle.config["tokens_per_image"])
    size = int(bundle.config["vision"]["image_size"])
    if args.child:
        print(json.dumps(features(json.loads(args.child), size, n_embd, tokens)))
        return 0
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        sys.exit("int8_without_vnni: qemu-x86_64 not found: apt-get install qemu-user")
    paths = {a.id: str(bundle.path(a)) for a in bundle.artifacts
             if a.kind == "encoder" and a.format == "onnx" and a.precision in ("fp32", "int8", "int8_static")}
    if "onnx:fp32" not in paths:
        sys.exit(f"int8_without_vnni: {args.bundle} has no onnx:fp32 encoder to compare with: convert with "
                 f"--onnx-vision fp32,int8")
    with tempfile.TemporaryDirectory() as tmp:
        if args.full_range:
            fp32 = Path(paths["onnx:fp32"])  # typed_copy writes beside its source: not into the bundle
            for f in [fp32, *fp32.parent.glob(fp32.name + ".*")]:  # with any external weights, same names
                shutil.copy(f, Path(tmp) / f.name)
            control = Path(tmp) / fp32.name
            paths["onnx:int8 full-range (control)"] = str(full_range_control(control, Path(tmp) / "full.onnx"))
        runs: dict[str, Any] = {}
        for cpu, prefix in (("this CPU", []), (f"emulated {EMULATED}", [qemu, "-cpu", EMULATED])):
            cmd = [*prefix, sys.executable, __file__, "--bundle", str(args.bundle), "--child", json.dumps(paths)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True)
            feats = {k: np.asarray(v) for k, v in json.loads(done.stdout.splitlines()[-1]).items()}
            runs[cpu] = {k: compare(feats["onnx:fp32"], v) for k, v in feats.items() if k != "onnx:fp32"}
    rows = [f"| {name} | " + " | ".join(f"{runs[cpu][name]['cosine_min']:.6f} / {runs[cpu][name]['max_abs']:.3f}"
                                         for cpu in runs) + " |" for name in runs["this CPU"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8-without-vnni.json").write_text(json.dumps({"bundle": str(args.bundle), "runs": runs}, indent=1))
    md = ["| encoder vs onnx:fp32 (worst-token cosine / max abs diff) | " + " | ".join(runs) + " |",
          "|---|" + "---|" * len(runs), *rows]
    (args.out / "int8-without-vnni.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
