"""The measured side of `vision_candidates.py`: variant graphs it builds, and one candidate's encodes in this process.

    .venv/bin/python benchmarks/vision_variants.py --child SPEC_JSON     (run by vision_candidates.py; also
        --reference CKPT IMAGE OUT.npy, --fuse-qkv FP32.onnx OUT.onnx, --static-int8 BF16.xml FILMS_DIR OUT.xml)

A candidate is an encoder artifact of the bundle plus knobs the runtime could set differently:
- ONNX Runtime: `graph` (a variant graph built here instead of the bundle's), `iobinding` (ORT writes the
  output into a preallocated array), `affinity` (pin the intra-op threads, one per core), `batch` (images per
  call; the figure is per image);
- OpenVINO: `hint` (inference precision instead of the one the runtime picks for this CPU), `graph` (a variant IR
  built here), `ov_config` (CPU plugin properties on top of the runtime's), `batch`;
- mtmd: `threads`.
Timings are wall and process-CPU seconds per image; cosine is the worst token against torch fp32 on the same
pixels (the reference the parent computed once).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULT = "CANDIDATE_RESULT "


# -- variant graphs (built once by the parent, in its work folder) ------------------------------------------
def fuse_qkv(fp32_graph: Path, out: Path) -> Path:
    """The bundle's fp32 graph with each layer's three Q/K/V MatMuls as one [W, 3W] MatMul + Split, then int8
    as the converter quantizes (`quantize_int8_dynamic`): one activation pass and one GEMM instead of three."""
    import onnx
    from onnx import helper, numpy_helper

    from convert.writers.onnx_vision import _save, quantize_int8_dynamic

    model = onnx.load(str(fp32_graph))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    by_output = {n.output[0]: n for n in g.node}
    nodes, fused = list(g.node), 0
    drop: set[int] = set()
    extra: dict[int, list[Any]] = {}
    for node in nodes:
        if node.op_type != "MultiHeadAttention":
            continue
        mms = [by_output.get(x) for x in node.input[:3]]
        if not all(m is not None and m.op_type == "MatMul" and m.input[1] in inits for m in mms) \
                or len({m.input[0] for m in mms}) != 1:
            continue
        w = np.concatenate([numpy_helper.to_array(inits[m.input[1]]) for m in mms], axis=1)
        name = f"{node.name}_qkv"
        g.initializer.append(numpy_helper.from_array(w, f"{name}_weight"))
        split = helper.make_tensor(f"{name}_split", onnx.TensorProto.INT64, [3], [w.shape[1] // 3] * 3)
        g.initializer.append(split)
        extra[id(mms[0])] = [helper.make_node("MatMul", [mms[0].input[0], f"{name}_weight"], [f"{name}_out"],
                                              name=f"{name}_matmul"),
                             helper.make_node("Split", [f"{name}_out", f"{name}_split"], list(node.input[:3]),
                                              name=f"{name}_split", axis=-1)]
        drop |= {id(m) for m in mms}
        for m in mms:
            g.initializer.remove(inits[m.input[1]])
        fused += 1
    del g.node[:]
    for node in nodes:
        g.node.extend(extra.get(id(node), []))
        if id(node) not in drop:
            g.node.append(node)
    staged = out.with_name("fp32-" + out.name)
    _save(model, staged)  # one file, as the converter saves it: ORT's quantizer lost external data from its temp dir
    quantize_int8_dynamic(staged, out)
    print(f"fused QKV in {fused} layers -> {out}", file=sys.stderr)
    return out


def static_int8(bf16_ir: Path, films: list[Path], out: Path) -> Path:
    """NNCF's calibrated (static) int8 of the bundle's ov:bf16 IR, as its docs advise for transformers: int8
    weights and activations, attention included. Not a shipped precision: it missed the 0.999 cosine floor."""
    import nncf
    import openvino as ov

    from convert.registry import load_spec
    from convert.writers.onnx_vision import calibration_pixels
    from medgemma_edge.backends.openvino.vision import weights_path

    spec = load_spec(Path(json.loads((bf16_ir.parent / "manifest.json").read_text())["source"]["path"]))
    model = ov.Core().read_model(str(bf16_ir), str(weights_path(bf16_ir)))
    data = nncf.Dataset([calibration_pixels(f, spec)[None] for f in films])
    quantized = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER,
                              preset=nncf.QuantizationPreset.MIXED, subset_size=len(films))
    staged = out.with_name("staged-" + out.name)
    ov.save_model(quantized, str(staged), compress_to_fp16=True)
    staged.with_suffix(".bin").replace(weights_path(out))
    staged.replace(out)
    return out


# -- one candidate, in this (fresh) process ------------------------------------------------------------------
def _ort_encode(path: Path, knobs: dict[str, Any], threads: int, tokens: int, hidden: int) -> Any:
    import onnxruntime as ort

    from medgemma_edge.inputs.images import normalise

    opts = ort.SessionOptions()  # as backends/onnx/vision.py: EXTENDED, no spinning
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if knobs.get("affinity"):  # pool threads 2..n on cores 2..n (1-based); the caller's thread on core 1
        opts.add_session_config_entry("session.intra_op_thread_affinities", ";".join(str(c) for c in
                                                                                     range(2, threads + 1)))
        os.sched_setaffinity(0, {0})
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    if not knobs.get("iobinding"):
        return lambda imgs: np.array(session.run(None, {name: normalise(imgs)})[0], dtype=np.float32)
    binding = session.io_binding()

    def encode(imgs: np.ndarray) -> np.ndarray:
        out = np.empty((len(imgs), tokens, hidden), np.float32)
        pixels = normalise(imgs)
        binding.bind_cpu_input(name, pixels)
        binding.bind_output(session.get_outputs()[0].name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        session.run_with_iobinding(binding)
        return out
    return encode


def peak_rss_mb() -> float:
    """This process's own peak RSS. VmHWM, not getrusage: ru_maxrss survives exec, so a child would report its
    parent's RSS at the fork whenever that was higher (seen: 549 MB for every tiny encoder)."""
    import resource

    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from convert.fidelity.metrics import compare
    from medgemma_edge.bundle import open_bundle
    from medgemma_edge.inputs.images import resize_square
    from medgemma_edge.measure.worker import CpuWatch

    knobs, threads = spec["knobs"], int(spec["threads"])
    b = open_bundle(spec["bundle"])
    a = b.find("encoder", spec["artifact"])
    cfg = b.config
    hidden, tokens, size = int(cfg["text"]["hidden_size"]), int(cfg["tokens_per_image"]), int(cfg["vision"]["image_size"])
    path = Path(knobs["graph"]) if knobs.get("graph") else b.path(a)
    image = resize_square(Path(spec["image"]), size)
    batch = int(knobs.get("batch", 1))
    images = np.stack([image] * batch)
    t0 = time.perf_counter()
    providers = None
    if a.format == "gguf":
        from medgemma_edge.backends.llama_cpp.mtmd import MtmdEncoder

        enc = MtmdEncoder(path, b.path(b.vocab_artifact()), hidden, cfg["vision"], tokens,
                          n_threads=int(knobs.get("threads", threads)))
        encode = lambda imgs: np.stack([enc.encode(i) for i in imgs])  # noqa: E731 - one image per mtmd call
    elif a.format == "ov":
        from medgemma_edge.backends.openvino.vision import OpenVinoEncoder

        ov_enc = OpenVinoEncoder(path, hidden, tokens, n_threads=threads,
                                 precision_hint=knobs.get("hint", a.recipe.get("inference_precision", "bf16")),
                                 extra_config=knobs.get("ov_config"), fit_to_cpu="hint" not in knobs)
        encode, providers = ov_enc.encode_batch, ov_enc.providers
    else:
        encode = _ort_encode(path, knobs, threads, tokens, hidden)
    load_s = time.perf_counter() - t0
    watch = CpuWatch()
    out = encode(images)  # warm-up: first-call allocations and kernel choices
    walls, cpus = [], []
    for _ in range(int(spec["reps"])):
        c0, w0 = time.process_time(), time.perf_counter()
        out = encode(images)
        walls.append((time.perf_counter() - w0) / batch)
        cpus.append((time.process_time() - c0) / batch)
    ref = np.load(spec["reference"])
    fig = compare(ref, out[0])
    return {"load_s": load_s, "encode_s": walls, "cpu_s": cpus, "peak_rss_mb": peak_rss_mb(),
            "other_cores": watch.other_cores(), "cosine_min": fig["cosine_min"], "max_abs": fig["max_abs"],
            "ran": providers}


def torch_reference(checkpoint: Path, image: Path, out: Path) -> Path:
    """transformers' SigLIP + projector (fp32) on the image as the runtime preprocesses it: [tokens, hidden]."""
    import torch

    from convert.checkpoint import Checkpoint
    from convert.registry import load_spec
    from convert.writers.onnx_vision import build_torch_module, calibration_pixels

    spec = load_spec(checkpoint)
    module = build_torch_module(Checkpoint(checkpoint), spec)
    with torch.no_grad():
        ref = module(torch.from_numpy(calibration_pixels(image, spec)[None])).numpy()[0]
    np.save(out, ref)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(RESULT + json.dumps(measure(json.loads(sys.argv[2]))), flush=True)
    elif len(sys.argv) == 5 and sys.argv[1] == "--reference":
        torch_reference(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--fuse-qkv":
        fuse_qkv(Path(sys.argv[2]), Path(sys.argv[3]))
    elif len(sys.argv) == 5 and sys.argv[1] == "--static-int8":
        static_int8(Path(sys.argv[2]), sorted(Path(sys.argv[3]).glob("*.png")), Path(sys.argv[4]))
    else:
        sys.exit(__doc__)
