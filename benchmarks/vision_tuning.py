"""Vision-encoder knobs on a full-size bundle, one fresh process per variant (time and peak RSS its own).

    .venv/bin/python benchmarks/vision_tuning.py BUNDLE --out benchmarks/results/<hw>-4b/vision-tuning.json

Each variant's prediction is written down here, before it was measured; the markdown it prints puts
prediction and measurement side by side. Complements `medgemma-edge bench`, which times every
artifact as shipped; this times what the runtime could set differently.
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

# (label, artifact, knobs, prediction made before measuring)
VARIANTS: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    ("int8 as shipped (ORT_ENABLE_ALL, 2 threads)", "onnx:int8", {}, "control"),
    ("int8, session optimisation BASIC", "onnx:int8", {"level": "BASIC"},
     "same time: the graph was fused offline, the session has little left to do"),
    ("int8, no spin-waiting", "onnx:int8", {"spin": False},
     "a few % slower: 2 threads hand work back and forth many times per layer"),
    ("int8, memory arena off", "onnx:int8", {"arena": False},
     "same time, similar peak RSS: the peak is one layer's attention scores either way"),
    ("int8, 1 thread", "onnx:int8", {"threads": 1}, "~1.9x slower: GEMMs scale across both cores"),
    ("mtmd F16, 2 threads", "gguf:f16", {"threads": 2}, "control for mtmd"),
    ("mtmd F16, 4 threads (mtmd's default)", "gguf:f16", {"threads": 4},
     "~10% slower than 2 threads: oversubscribed cores"),
)


def measure(bundle: Path, artifact: str, knobs: dict[str, Any], reps: int) -> dict[str, Any]:
    """In the child: build the encoder with the knobs, 1 warm-up + reps timed encodes of one 896 image."""
    import numpy as np

    from medgemma_edge.measure.worker import CpuWatch, peak_rss_mb
    from medgemma_edge.bundle import open_bundle
    from medgemma_edge.inputs.samples import sample_image
    from medgemma_edge.inputs.images import resize_square

    b = open_bundle(bundle)
    path, cfg = b.path(b.find("encoder", artifact)), b.config
    size, hidden = int(cfg["vision"]["image_size"]), int(cfg["text"]["hidden_size"])
    image = resize_square(sample_image(Path("/tmp") / "vision-tuning.png", size=(1024, 880)), size)
    threads = knobs.get("threads", 2)
    if artifact.startswith("gguf:"):
        from medgemma_edge.backends.llama_cpp.mtmd import MtmdEncoder

        encode = MtmdEncoder(path, b.path(b.vocab_artifact()), hidden, cfg["vision"], int(cfg["tokens_per_image"]),
                             n_threads=threads).encode
    else:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{knobs.get('level', 'ALL')}")
        opts.intra_op_num_threads = threads
        opts.enable_cpu_mem_arena = knobs.get("arena", True)
        if not knobs.get("spin", True):
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        from medgemma_edge.inputs.images import normalise

        def encode(img: np.ndarray) -> np.ndarray:
            return sess.run(None, {name: normalise(img[None])})[0]
    watch = CpuWatch()
    encode(image)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        encode(image)
        times.append(time.perf_counter() - t0)
    return {"times_s": times, "mean_s": statistics.fmean(times), "sd_s": statistics.stdev(times) if reps > 1 else 0.0,
            "peak_rss_mb": peak_rss_mb(), "other_cores": watch.other_cores()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        print("RESULT " + json.dumps(measure(Path(spec["bundle"]), spec["artifact"], spec["knobs"], spec["reps"])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for label, artifact, knobs, prediction in VARIANTS:
        spec = {"bundle": str(args.bundle), "artifact": artifact, "knobs": knobs, "reps": args.reps}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        result = json.loads(line[7:]) if line else {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        rows.append({"variant": label, "artifact": artifact, "knobs": knobs, "prediction": prediction, **result})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| variant | encode s (mean ± sd) | peak RSS GB | other procs (cores) | prediction before measuring |",
             "|---|---|---|---|---|"]
    for r in rows:
        fig = f"{r['mean_s']:.2f} ± {r['sd_s']:.2f} | {r['peak_rss_mb'] / 1024:.2f} | {r['other_cores']}" \
            if "mean_s" in r else f"failed: {r['error']} | - | -"
        lines.append(f"| {r['variant']} | {fig} | {r['prediction']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
