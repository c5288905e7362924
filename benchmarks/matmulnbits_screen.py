"""Screen behind the ONNX decoder's block size: one MatMulNBits at MedGemma 4B's gate/up shape, per block length.

    .venv/bin/python benchmarks/matmulnbits_screen.py [--m 256] [--threads 2] [--reps 3]

K 2560, N 20480 (gate and up fused), M rows of activations (256: an image span; 1: a decode step), random codes
and scales (the values do not change the work). Prints the best of --reps seconds and GOPS per (block, accuracy
level, bits).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

K, N = 2560, 20480
CASES = [(32, 4, 4), (64, 4, 4), (128, 4, 4), (32, 0, 4), (32, 4, 8)]  # (block, accuracy_level, bits)


def session(block: int, level: int, bits: int, threads: int):  # noqa: ANN201 - an onnxruntime session
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    blocks = K // block
    codes = rng.integers(0, 256, (N, blocks, block * bits // 8), dtype=np.uint8)
    scales = rng.random(N * blocks, dtype=np.float32) * np.float32(0.01)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "screen", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
                              [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    a = np.random.default_rng(1).normal(0, 1, (args.m, K)).astype(np.float32)
    for block, level, bits in CASES:
        s = session(block, level, bits, args.threads)
        s.run(None, {"A": a})  # prepacks the weights
        best = float("inf")
        for _ in range(args.reps):
            t = time.perf_counter()
            s.run(None, {"A": a})
            best = min(best, time.perf_counter() - t)
        print(f"block {block:3d}  accuracy_level {level}  bits {bits}: {best * 1000:7.1f} ms  "
              f"{2 * K * N * args.m / best / 1e9:6.0f} GOPS", flush=True)


if __name__ == "__main__":
    main()
