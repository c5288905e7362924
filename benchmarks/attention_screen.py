"""Screen behind the vision graph's attention op: ORT's CPU `Attention` vs `MultiHeadAttention`.

    .venv/bin/python benchmarks/attention_screen.py [--threads 2] [--reps 3]

One SigLIP layer's attention at MedGemma 4B size (4096 patches, width 1152, 16 heads), random weights,
each op in a fresh process: seconds per call and how much the process's peak RSS grew. `Attention`
(packed QKV, what the ORT optimizer's CLIP fusion emits) holds all 16 x 4096 x 4096 scores at once;
`MultiHeadAttention` (separate Q/K/V MatMuls, what convert/writers/onnx_fusion.split_attention writes) tiles them.
Prints one JSON line per op and their largest output difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

PATCHES, WIDTH, HEADS = 4096, 1152, 16


def build(op: str) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 0.02, (WIDTH, 3 * WIDTH)).astype(np.float32)
    b = np.zeros(3 * WIDTH, np.float32)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, PATCHES, WIDTH]) for n in ("x", "y")]
    if op == "Attention":
        nodes = [helper.make_node("Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=HEADS)]
        inits = [numpy_helper.from_array(w, "w")]
    else:
        nodes = [helper.make_node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"]
        nodes.append(helper.make_node("MultiHeadAttention", ["q", "k", "v", "b"], ["y"], domain="com.microsoft",
                                      num_heads=HEADS))
        inits = [numpy_helper.from_array(np.ascontiguousarray(part), f"w{p}") for p, part in zip("qkv", np.split(w, 3, 1))]
    graph = helper.make_graph(nodes, op, [io[0]], [io[1]], [*inits, numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def measure(op: str, threads: int, reps: int) -> dict[str, object]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(build(op), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(0, 1, (1, PATCHES, WIDTH)).astype(np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps + 1):  # the first call is a warm-up
        t0 = time.perf_counter()
        y = session.run(None, {"x": x})[0]
        times.append(time.perf_counter() - t0)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"op": op, "threads": threads, "seconds": [round(t, 3) for t in times[1:]], "peak_rss_growth_mb": round(grew),
            "checksum": y[0, :4, :4].round(6).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--op", choices=["Attention", "MultiHeadAttention"], help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args()
    if args.op:
        print(json.dumps(measure(args.op, args.threads, args.reps)))
        return
    rows = []
    for op in ("Attention", "MultiHeadAttention"):
        out = subprocess.run([sys.executable, __file__, "--op", op, "--threads", str(args.threads), "--reps",
                              str(args.reps)], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out))
        print(out.strip())
    diff = np.abs(np.array(rows[0]["checksum"]) - np.array(rows[1]["checksum"])).max()
    print(json.dumps({"max_output_difference": float(diff)}))


if __name__ == "__main__":
    main()
