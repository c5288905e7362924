"""Which execution provider takes each node of our ONNX graphs, how long a forward takes there, and how far
its outputs are from ONNX Runtime's CPU provider (issue 13, "Other execution providers").

Runs in the environment of the provider under test, since onnxruntime-openvino replaces the
`onnxruntime` module (benchmarks/README.md, "Execution providers"). It imports nothing from
medgemma_edge but the decoder's I/O contract, read from its file.

    python benchmarks/ep_placement.py GRAPH.onnx [GRAPH.onnx ...] --ep openvino|ovplugin|cpu
                                      [--runs 3] [--ov-options JSON] [--json FILE]

`openvino`: the OpenVINOExecutionProvider built into onnxruntime-openvino. `ovplugin`: the
onnxruntime-ep-openvino plugin library registered into a stock onnxruntime. Each session is made in
a child process at log level VERBOSE, whose "Node placements" block (session_state.cc) says where
every node went. The CPU provider's outputs on the same inputs are the reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

_IO = Path(__file__).resolve().parents[1] / "medgemma_edge" / "backends" / "onnx" / "decoder_io.py"


def _decoder_io() -> Any:
    spec = importlib.util.spec_from_file_location("decoder_io", _IO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def feed_for(path: Path, n: int = 16, capacity: int = 64) -> dict[str, np.ndarray]:
    """Inputs for one forward: a 16-token text prompt for our decoder, random pixels for a vision graph."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    io = _decoder_io()
    rng = np.random.default_rng(0)
    if io.WRITE_INDEX in inputs:
        # written from 4 slots before the end, so the cache write wraps round the buffer (a ring's case)
        feed = {io.INPUT_IDS: rng.integers(1000, 200_000, (1, n)), io.POSITION_IDS: np.arange(n)[None],
                io.LOGITS_INDEX: np.array([n - 1]), io.WRITE_INDEX: np.array([capacity - 4])}
        hidden = inputs[io.INPUTS_EMBEDS].type.tensor_type.shape.dim[2].dim_value
        feed[io.INPUTS_EMBEDS] = np.zeros((1, 0, hidden), np.float32)
        causal = np.arange(capacity)[None, :] <= np.arange(n)[:, None]
        for name in io.MASKS.values():
            if name in inputs:
                feed[name] = np.where(causal, 0, -1e30).astype(np.float32)[None, None]
        for name, value in inputs.items():
            if name.startswith("cache_"):
                dims = value.type.tensor_type.shape.dim
                feed[name] = np.zeros((1, dims[1].dim_value, capacity, dims[3].dim_value), np.float32)
        return {k: (v.astype(np.int64) if v.dtype.kind == "i" else v) for k, v in feed.items()}
    feed = {}
    for name, value in inputs.items():
        dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        feed[name] = rng.random(dims, dtype=np.float32) * 2 - 1
    return feed


def _one_line(exc: BaseException) -> str:
    """A provider's multi-line error, shortened to where it says what failed."""
    text = " ".join(str(exc).split())
    said = re.findall(r"(OpenVINO does not support[^.]*|Could not find an implementation for [^ ]+|Check '[^']*' failed"
                      r"[^:]*:[^:]*:[^:]*)", text)
    return "; ".join(dict.fromkeys(said)) if said else text[:200] + (" ... " + text[-300:] if len(text) > 500 else "")


def child(path: str, ep: str, feed_path: str, out_path: str, runs: int, ov_options: str) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 0  # VERBOSE: ORT prints where each node was placed
    opts.intra_op_num_threads = int(os.environ.get("EP_THREADS", "2"))
    extra = json.loads(ov_options or "{}")
    providers: list[Any] | None
    if ep == "ovplugin":
        import onnxruntime_ep_openvino as plugin

        ort.register_execution_provider_library("OpenVINOExecutionProvider", plugin.get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == "OpenVINOExecutionProvider"
                   and d.ep_metadata.get("ov_device") == "CPU"]
        opts.add_provider_for_devices(devices[:1], extra)
        providers = None  # the CPU provider stays the fallback
    elif ep == "openvino":
        providers = [("OpenVINOExecutionProvider", {"device_type": "CPU", **extra}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    result: dict[str, Any] = {"onnxruntime": ort.__version__}
    t0 = time.perf_counter()
    try:
        session = ort.InferenceSession(path, opts, providers=providers) if providers else ort.InferenceSession(path, opts)
    except Exception as exc:  # noqa: BLE001 - report whatever the provider raised, in one line
        result["create_error"] = _one_line(exc)
        print("@@RESULT@@" + json.dumps(result), flush=True)
        return
    result.update(providers=session.get_providers(), create_s=time.perf_counter() - t0)
    feed = dict(np.load(feed_path))
    try:
        times = []
        for _ in range(runs + 1):  # the first run pays compilation and prepacking
            t = time.perf_counter()
            outs = session.run(None, feed)
            times.append(time.perf_counter() - t)
        result.update(first_s=times[0], mean_s=float(np.mean(times[1:])) if runs else None)
        np.savez(out_path, **{o.name: v for o, v in zip(session.get_outputs(), outs)})
    except Exception as exc:  # noqa: BLE001
        result["run_error"] = _one_line(exc)
    print("@@RESULT@@" + json.dumps(result), flush=True)


def placement(log: str) -> dict[str, dict[str, Any]]:
    """ORT's VERBOSE placement block -> {provider: {"nodes": n, "ops": {op: count} or "all"}}."""
    out: dict[str, dict[str, Any]] = {}
    current = None
    for line in log.splitlines():
        if "VerifyEachNodeIsAssignedToAnEp]" not in line:
            continue
        body = line.split("VerifyEachNodeIsAssignedToAnEp]", 1)[1]
        whole = re.search(r"All nodes placed on \[(\w+)\]\. Number of nodes: (\d+)", body)
        some = re.search(r"Node\(s\) placed on \[(\w+)\]\. Number of nodes: (\d+)", body)
        if whole:
            out[whole.group(1)] = {"nodes": int(whole.group(2)), "ops": "all"}
            current = None
        elif some:
            current = some.group(1)
            out[current] = {"nodes": int(some.group(2)), "ops": Counter()}
        elif current and body.startswith("   "):
            out[current]["ops"][body.strip().split(" (")[0]] += 1
    return {ep: {"nodes": d["nodes"], "ops": d["ops"] if d["ops"] == "all" else dict(d["ops"])} for ep, d in out.items()}


def _kind(op: str, ep: str) -> str:
    """A provider's fused subgraphs are listed as nodes named after it (OpenVINOExecutionProvider_<hash>_<k>)."""
    return ep if op.startswith((ep, "OpenVINO-EP-subgraph")) else op


def measure(path: Path, ep: str, runs: int, ov_options: str, work: Path) -> dict[str, Any]:
    feed_path, out_path = work / f"{path.stem}.feed.npz", work / f"{path.stem}.{ep}.out.npz"
    np.savez(feed_path, **feed_for(path))
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), ep, str(feed_path), str(out_path),
                           str(runs), ov_options], capture_output=True, text=True, timeout=3600)
    log = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    result = json.loads(lines[-1][len("@@RESULT@@"):]) if lines else {"crash": f"exit {proc.returncode}: " +
                                                                    (log.strip().splitlines() or ["?"])[-1][:300]}
    result["placement"] = placement(log)
    result["outputs"] = str(out_path) if out_path.exists() else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graphs", nargs="*", type=Path)
    parser.add_argument("--ep", default="openvino", choices=["openvino", "ovplugin", "cpu"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ov-options", default="", help='provider options as JSON, e.g. {"precision": "FP32"}')
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, ep, feed, out, runs, ov = args.child
        child(path, ep, feed, out, int(runs), ov)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for graph in args.graphs:
            row: dict[str, Any] = {"graph": str(graph), "ep": args.ep}
            row["result"] = measure(graph, args.ep, args.runs, args.ov_options, Path(tmp))
            if args.ep != "cpu":
                row["cpu"] = measure(graph, "cpu", args.runs, "", Path(tmp))
                ours, ref = row["result"].get("outputs"), row["cpu"].get("outputs")
                if ours and ref:
                    a, b = np.load(ours), np.load(ref)
                    diff = {k: float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a.files}
                    caches = [v for k, v in diff.items() if k.startswith("present_")]  # the in-place writes
                    row["max_abs_diff_vs_cpu"] = {k: v for k, v in diff.items() if not k.startswith("present_")}
                    if caches:
                        row["max_abs_diff_vs_cpu"]["every cache buffer"] = max(caches)
            rows.append(row)
    for row in rows:
        r = row["result"]
        status = r.get("create_error") or r.get("run_error") or r.get("crash") or "ran"
        print(f"{row['graph']} on {row['ep']} (onnxruntime {r.get('onnxruntime', '?')}): {status}")
        for ep, d in r["placement"].items():
            if d["ops"] == "all":
                print(f"  {ep}: all {d['nodes']} nodes")
                continue
            ops: Counter[str] = Counter()
            for op, n in d["ops"].items():
                ops["fused subgraphs" if _kind(op, ep) == ep else op] += n
            print(f"  {ep}: {d['nodes']} nodes {dict(ops)}")
        if "mean_s" in r:
            cpu = row.get("cpu", {})
            print(f"  forward: first {r['first_s']:.3f} s, then {r['mean_s']:.3f} s"
                  + (f" (CPU provider {cpu['mean_s']:.3f} s)" if cpu.get("mean_s") else ""))
        if row.get("max_abs_diff_vs_cpu"):
            print(f"  max |output - CPU provider's|: {row['max_abs_diff_vs_cpu']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
