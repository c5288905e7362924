"""One-off CPU timings of the FULL-SIZE vision encoder: ONNX fp32 / int8 (dynamic, static) vs llama.cpp mtmd F16.

    python benchmarks/vision_onnx_oneoff.py --ckpt /tmp/big/ckpt4b \
        --mmproj /tmp/big/bundle4b/mmproj-f16.gguf --vocab /tmp/big/bundle4b/decoder-q4_k_m.gguf

Exports each ONNX variant from the checkpoint (sequentially: one 1.7 GB graph at a time), validates it
against the torch module as the converter always does, then times one 896x896 encode through the
runtime encoders (1 warm-up + N reps, fixed threads). Compares the plain TorchScript export with
the converter's fused graph (ORT transformers optimizer: attention, SkipLayerNorm, FastGelu). Writes
benchmarks/results/vision-oneoff-<cpu>-<cores>c.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from convert.fidelity.metrics import compare  # numpy only: loads neither torch nor transformers
from convert.registry import load_spec
from medgemma_edge.inputs.samples import sample_image
from medgemma_edge.errors import UserError
from medgemma_edge.inputs.images import resize_square

log = logging.getLogger("vision_oneoff")
# (label, precision, fused graph?)
VARIANTS = [("onnx fp32 (plain export)", "fp32", False), ("onnx fp32 (ORT-fused)", "fp32", True),
            ("onnx int8 dynamic (plain export)", "int8", False), ("onnx int8 dynamic (ORT-fused)", "int8", True),
            ("onnx int8 static QDQ (ORT-fused)", "int8_static", True), ("onnx fp16 (ORT-fused)", "fp16", True)]
UNTIMED = ("fp16",)  # a GPU precision: on CPU, ORT upcasts around most fused ops; validated, not timed


def cpu_info() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = re.search(r"flags\s*:\s*(.*)", text)
    simd = sorted(f for f in (flags.group(1).split() if flags else []) if f.startswith(("avx", "amx", "fma")))
    return {"model": model.group(1).strip() if model else platform.processor(), "cores": os.cpu_count(),
            "simd": simd, "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def mem_available_gb() -> float:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable"))
    return round(int(line.split()[1]) / 2**20, 1)


def time_encoder(encoder: Any, image: np.ndarray, reps: int) -> tuple[np.ndarray, dict[str, Any]]:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = encoder.encode(image)  # warm-up: first-run allocations, lazy kernel setup
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = encoder.encode(image)
        times.append(time.perf_counter() - t0)
    # load average before/after: other processes on a 2-core machine show up here, not in sd
    return out, {"mean_s": statistics.mean(times), "sd_s": statistics.stdev(times) if reps > 1 else 0.0,
                 "runs_s": [round(t, 3) for t in times], "warmup_s": round(warmup, 3),
                 "loadavg_1m": [round(load, 2), round(os.getloadavg()[0], 2)]}


def export(args: argparse.Namespace) -> None:
    """Phase 1 (torch): write and validate every ONNX variant into --workdir, recipes in variants.json."""
    from convert.checkpoint import Checkpoint
    from convert.writers.onnx_vision import VisionExporter
    from convert.registry import load_spec

    spec, work = load_spec(args.ckpt), args.workdir
    (work / "calib").mkdir(parents=True, exist_ok=True)
    for i in range(args.calib):  # film-like calibration set, different from the timed image
        sample_image(work / "calib" / f"cxr{i}.png", size=(900 + 40 * i, 800), seed=100 + i)
    t0 = time.perf_counter()
    exporter = VisionExporter(Checkpoint(args.ckpt), spec, workdir=work)
    done: dict[str, Any] = {"setup_s": round(time.perf_counter() - t0, 1), "fused_ops": exporter.fused, "rows": []}
    old = work / "variants.json"  # a partial re-run (--only) replaces its rows and keeps the others
    kept = [r for r in json.loads(old.read_text())["rows"]] if old.is_file() else []
    log.info("export + torch reference + fusion: %.0f s, fused ops %s", done["setup_s"], exporter.fused)
    with exporter:
        for label, precision, fused in VARIANTS:
            if args.only and not any(k in label for k in args.only):
                continue
            row: dict[str, Any] = {"encoder": label, "precision": precision, "fused": fused,
                                   "file": f"vision-{precision}-{'fused' if fused else 'plain'}.onnx"}
            t0 = time.perf_counter()
            try:
                recipe = exporter.write(work / row["file"], precision,
                                        work / "calib" if precision == "int8_static" else None, fused=fused)
            except UserError as exc:  # a missed fidelity floor is a result too
                row["error"] = str(exc)
                log.error("%s: %s", label, exc)
            else:
                row.update(write_s=round(time.perf_counter() - t0, 1), validation=recipe["validation"],
                           quantization=recipe["quantization"], optimizer=recipe["optimizer"])
                log.info("%s written in %.0f s, mem available %.1f GB", label, row["write_s"], mem_available_gb())
            done["rows"].append(row)
    labels = [v[0] for v in VARIANTS]
    done["rows"] = sorted([r for r in kept if r["encoder"] not in {x["encoder"] for x in done["rows"]}] + done["rows"],
                          key=lambda r: labels.index(r["encoder"]))
    done["export_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
    (work / "variants.json").write_text(json.dumps(done, indent=1))


class LevelEncoder:
    """The plain export in a bare ORT session at a chosen graph optimisation level (OnnxEncoder uses ALL)."""

    def __init__(self, path: Path, level: str, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def encode(self, image: np.ndarray) -> np.ndarray:
        from medgemma_edge.inputs.images import normalise

        return self.session.run(None, {"pixel_values": normalise(image[None])})[0][0].copy()  # unpin the arena


def time_all(args: argparse.Namespace) -> dict[str, Any]:
    """Phase 2 (no torch in the process): time every written variant and mtmd F16 on one image."""
    from medgemma_edge.backends.onnx.vision import OnnxEncoder

    spec, work = load_spec(args.ckpt), args.workdir
    done = json.loads((work / "variants.json").read_text())
    image = resize_square(sample_image(work / "cxr.png", size=(1024, 880), seed=7), spec.vision.image_size)
    rows, outputs = done["rows"], {}
    fp32 = [r for r in rows if r["precision"] == "fp32" and "error" not in r]
    for base in fp32:  # ORT session optimisation levels other than the runtime's ALL, on both graphs
        for level in args.levels:
            label = f"{base['encoder'][:-1]}, session {level})"
            enc = LevelEncoder(work / base["file"], level, args.threads)
            outputs[label], timing = time_encoder(enc, image, args.reps)
            rows.append({"encoder": label, "precision": "fp32", "fused": base["fused"], "session_level": level,
                         "size_mb": round((work / base["file"]).stat().st_size / 2**20, 1), "load_s": 0.0,
                         "encode": timing, "threads": args.threads})
            del enc
            log.info("%s: %.2f ± %.2f s", label, timing["mean_s"], timing["sd_s"])
    for row in rows:
        if "session_level" in row:
            continue
        path = work / row["file"]
        if "error" in row or not path.is_file() or row["precision"] in UNTIMED:
            continue
        row["size_mb"] = round(path.stat().st_size / 2**20, 1)
        t0 = time.perf_counter()
        enc = OnnxEncoder(path, spec.text.hidden_size, spec.tokens_per_image, n_threads=args.threads)
        row["load_s"] = round(time.perf_counter() - t0, 2)
        outputs[row["encoder"]], row["encode"] = time_encoder(enc, image, args.reps)
        row["providers"], row["threads"] = enc.providers, enc.threads
        enc.close()
        log.info("%s: %.2f ± %.2f s (loadavg %s)", row["encoder"], row["encode"]["mean_s"], row["encode"]["sd_s"],
                 row["encode"]["loadavg_1m"])
    if args.mmproj:
        from medgemma_edge.backends.llama_cpp.mtmd import MtmdEncoder

        t0 = time.perf_counter()
        enc = MtmdEncoder(args.mmproj, args.vocab, spec.text.hidden_size, spec.summary()["vision"], spec.tokens_per_image,
                          n_threads=args.threads)
        row = {"encoder": "llama.cpp mtmd F16", "precision": "f16", "load_s": round(time.perf_counter() - t0, 2),
               "size_mb": round(args.mmproj.stat().st_size / 2**20, 1), "threads": args.threads}
        outputs[row["encoder"]], row["encode"] = time_encoder(enc, image, args.reps)
        enc.close()
        log.info("mtmd F16: %.2f ± %.2f s", row["encode"]["mean_s"], row["encode"]["sd_s"])
        rows.append(row)
    # agreement on the timed image: every encoder vs the plain fp32 export (and vs mtmd F16)
    for row in rows:
        for ref_label, key in ((VARIANTS[0][0], "vs_onnx_fp32"), ("llama.cpp mtmd F16", "vs_mtmd_f16")):
            if row["encoder"] in outputs and ref_label in outputs and row["encoder"] != ref_label:
                row[key] = compare(outputs[ref_label], outputs[row["encoder"]])
    import onnxruntime

    return {"cpu": cpu_info(), "onnxruntime": onnxruntime.__version__, "threads": args.threads, "reps": args.reps,
            "warmup": 1, "image": f"{spec.vision.image_size}x{spec.vision.image_size} synthetic chest film",
            "checkpoint": str(args.ckpt), "calibration_images": args.calib, "setup_s": done["setup_s"],
            "fused_ops": done["fused_ops"], "export_peak_rss_gb": done.get("export_peak_rss_gb"),
            "timing_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
            "rows": rows}


def markdown(res: dict[str, Any]) -> str:
    c = res["cpu"]
    lines = ["# Full-size vision encoder (SigLIP-400M + projector, 896x896 -> 256 x 2560), CPU",
             "", f"CPU: {c['model']}, {c['cores']} cores, {c['mem_total_gb']} GB RAM; SIMD: {' '.join(c['simd'])}",
             f"onnxruntime {res['onnxruntime']}; threads = {res['threads']}; 1 warm-up + {res['reps']} reps; "
             f"weights: synthetic MedGemma 4B checkpoint (speed does not depend on values)", "",
             "| encoder | size MB | encode s (mean ± sd) | warm-up s | load s | loadavg before/after | "
             "cos min vs torch (3 val. images) | cos mean vs ONNX fp32 | cos mean vs mtmd F16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['encoder']} | | failed: {r['error']} | | | | | | |")
            continue
        if "encode" not in r:
            lines.append(f"| {r['encoder']} | | not timed (GPU precision) | | | | "
                         f"{r['validation']['cosine_min']:.5f} | | |")
            continue
        e = r["encode"]
        val = f"{r['validation']['cosine_min']:.5f}" if "validation" in r else "n/a"
        vs = [f"{r[k]['cosine_mean']:.5f}" if k in r else "-" for k in ("vs_onnx_fp32", "vs_mtmd_f16")]
        lines.append(f"| {r['encoder']} | {r['size_mb']:.0f} | {e['mean_s']:.2f} ± {e['sd_s']:.2f} | {e['warmup_s']:.1f} | "
                     f"{r['load_s']:.1f} | {e['loadavg_1m'][0]} / {e['loadavg_1m'][1]} | {val} | {vs[0]} | {vs[1]} |")
    lines += ["", f"Export + torch reference (3 images) + fusion: {res['setup_s']} s; peak RSS: export phase "
              f"{res['export_peak_rss_gb']} GB, timing phase {res['timing_peak_rss_gb']} GB.", ""]
    return "\n".join(lines + summary(res["rows"]))


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Ratios the issue asks about, computed from the table (nothing typed by hand)."""
    t = {r["encoder"]: r["encode"]["mean_s"] for r in rows if "encode" in r}
    pairs = [("ORT-fused vs plain export, fp32 (session ALL)", "onnx fp32 (ORT-fused)", "onnx fp32 (plain export)"),
             ("ORT-fused vs plain export, int8 dynamic", "onnx int8 dynamic (ORT-fused)", "onnx int8 dynamic (plain export)"),
             ("int8 dynamic vs fp32 (both fused)", "onnx int8 dynamic (ORT-fused)", "onnx fp32 (ORT-fused)"),
             ("int8 static vs fp32 (both fused)", "onnx int8 static QDQ (ORT-fused)", "onnx fp32 (ORT-fused)"),
             ("ONNX fp32 fused vs mtmd F16", "onnx fp32 (ORT-fused)", "llama.cpp mtmd F16"),
             ("ONNX int8 dynamic fused vs mtmd F16", "onnx int8 dynamic (ORT-fused)", "llama.cpp mtmd F16")]
    out = ["## Ratios (encode time, lower is faster)", ""]
    out += [f"- {name}: {t[a]:.2f} s / {t[b]:.2f} s = {t[a] / t[b]:.2f}x" for name, a, b in pairs if a in t and b in t]
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/big/ckpt4b"))
    ap.add_argument("--mmproj", type=Path, default=Path("/tmp/big/bundle4b/mmproj-f16.gguf"))
    ap.add_argument("--vocab", type=Path, default=Path("/tmp/big/bundle4b/decoder-q4_k_m.gguf"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vision-oneoff"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--calib", type=int, default=4, help="synthetic calibration images for int8 static")
    ap.add_argument("--levels", nargs="*", default=["ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED"],
                    help="extra ORT session optimisation levels to time the fp32 graphs at (ALL is the runtime's)")
    ap.add_argument("--only", nargs="*", help="substrings of variant labels to run (default: all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--phase", choices=["all", "export", "time", "report"], default="all",
                    help="export: write variants (torch); time: time what --workdir holds (no torch); all: both, "
                         "timing in a fresh process so the exporter's memory and threads do not skew it; "
                         "report: re-render the markdown from the JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.phase in ("all", "export"):
        export(args)
    if args.phase == "all":
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--phase", "time"], check=True)
    if args.phase not in ("time", "report"):
        return
    c = cpu_info()
    stem = f"vision-oneoff-{re.sub(r'[^a-z0-9]+', '-', c['model'].lower()).strip('-')}-{c['cores']}c"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase == "time":
        res = time_all(args)
        (args.out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    else:
        res = json.loads((args.out / f"{stem}.json").read_text())
    (args.out / f"{stem}.md").write_text(markdown(res))
    log.info("wrote %s", args.out / f"{stem}.md")


if __name__ == "__main__":
    main()
