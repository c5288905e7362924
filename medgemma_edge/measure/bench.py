"""`medgemma-edge bench`: every encoder/decoder combination of a bundle, timed honestly on this machine.

Each (round, combination) runs in a fresh worker process, so load time and peak RSS belong to that
combination alone. Combinations run in alternation, rotated each round, so drift (thermal, page
cache, a neighbour's job) hits all of them; warm-up rounds are run and discarded. Baselines take
part in the same rounds: llama.cpp's own mtmd path over the same GGUFs, and transformers fp32 when
a reference checkpoint is given.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medgemma_edge.measure.worker import RESULT_PREFIX
from medgemma_edge.bundle import Bundle, open_bundle
from medgemma_edge.errors import UserError
from medgemma_edge.inputs.samples import FOLLOWUP, SYSTEM
from medgemma_edge.bundle.precisions import DEFAULT_ORDER

log = logging.getLogger(__name__)

PROMPT = "Describe the findings in this image."  # kept as in the committed results, so figures compare
TEXT_PROMPT = "List three common causes of a pleural effusion."  # a text-only bundle's question
METRICS = ("load_s", "image_encode_ms", "prefill_image_tokens_per_s", "prefill_text_tokens_per_s", "ttft_ms",
           "decode_tokens_per_s", "followup_ttft_ms", "peak_rss_mb")


@dataclass(frozen=True)
class Combo:
    """kind: "pipeline" (ours), "llama.cpp" (mtmd's own path) or "transformers" (fp32 reference)."""

    kind: str
    encoder: str | None = None
    decoder: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "transformers":
            return "transformers:fp32"
        if self.kind == "llama.cpp":
            return f"llama.cpp:{_precision(self.encoder)}+{_precision(self.decoder)}"
        return f"{self.encoder}+{self.decoder}" if self.encoder else str(self.decoder)  # text-only: the decoder


def _precision(artifact_id: str | None) -> str:
    return str(artifact_id).split(":", 1)[-1]


def parse_combos(text: str, bundle: Bundle, reference: Path | None) -> list[Combo]:
    """`onnx:int8+gguf:q4_k_m,llama.cpp:f16+q4_k_m,transformers:fp32` -> combinations, checked against the bundle."""
    combos = []
    for item in (c.strip().lower() for c in text.split(",") if c.strip()):
        if item == "transformers:fp32":
            if reference is None:
                raise UserError("transformers:fp32 needs the checkpoint it was converted from: pass --reference DIR")
            combos.append(Combo("transformers"))
            continue
        if not bundle.has_vision:  # text-only: a combination is a decoder alone
            if "+" in item or item.startswith("llama.cpp:"):
                raise UserError(f"combination {item!r}: {bundle.dir} is text-only (no vision part); name decoders "
                                f"alone, e.g. gguf:q4_k_m (or transformers:fp32)")
            bundle.find("decoder", item)
            combos.append(Combo("pipeline", None, item))
            continue
        if "+" not in item:
            raise UserError(f"combination {item!r}: write ENCODER+DECODER, e.g. onnx:int8+gguf:q4_k_m "
                            f"(or llama.cpp:f16+q4_k_m, transformers:fp32)")
        enc, dec = item.split("+", 1)
        if enc.startswith("llama.cpp:"):
            combo = Combo("llama.cpp", f"gguf:{_precision(enc)}", f"gguf:{_precision(dec)}")
        else:
            combo = Combo("pipeline", enc, dec)
        bundle.find("encoder", combo.encoder)  # each raises a one-line error naming what the bundle has
        bundle.find("decoder", combo.decoder)
        combos.append(combo)
    if not combos:
        raise UserError("--combos is empty; e.g. --combos onnx:int8+gguf:q4_k_m,gguf:f16+gguf:q4_k_m")
    return combos


def default_combos(bundle: Bundle, reference: Path | None) -> list[Combo]:
    """Every encoder with the default decoder, every decoder with the default encoder, and the baselines."""
    encoders = [e for e in DEFAULT_ORDER["encoder"] if any(a.id == e and a.kind == "encoder" for a in bundle.artifacts)]
    decoders = [d for d in DEFAULT_ORDER["decoder"] if any(a.id == d and a.kind == "decoder" for a in bundle.artifacts)]
    if not bundle.has_vision and decoders:  # text-only: every decoder, and the transformers baseline
        return [Combo("pipeline", None, d) for d in decoders] + ([Combo("transformers")] if reference else [])
    if not encoders or not decoders:
        raise UserError(f"{bundle.dir}: bench needs at least one encoder and one decoder artifact")
    combos = [Combo("pipeline", e, decoders[0]) for e in encoders]
    combos += [Combo("pipeline", encoders[0], d) for d in decoders[1:]]
    ggufs = [e for e in encoders if e.startswith("gguf:")]
    if ggufs and decoders[0].startswith("gguf:"):
        combos.append(Combo("llama.cpp", ggufs[0], decoders[0]))
    if reference is not None:
        combos.append(Combo("transformers"))
    return combos


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """mean, sd and n of every metric over the measured (non-warm-up) runs."""
    out: dict[str, Any] = {}
    for key in {k for r in runs for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        out[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n": len(values)}
    return out


def _worker(combo: Combo, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    module = "convert.fidelity.bench_transformers" if combo.kind == "transformers" else "medgemma_edge.measure.worker"
    cmd = [sys.executable, "-m", module, json.dumps({**spec, **asdict(combo)})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}  # e.g. killed for memory (-9)


def bench_images(images: list[Path], work: Path, count: int) -> list[Path]:
    """The user's images, or synthetic chest-film-like ones (labelled as such in the report)."""
    if images:
        from medgemma_edge.inputs.images import check_image_path

        for p in images:
            check_image_path(p)
        return [images[i % len(images)] for i in range(count)]
    from medgemma_edge.inputs.samples import sample_image

    work.mkdir(parents=True, exist_ok=True)
    # a different size and aspect per image (cycling, so any count gives real images)
    return [sample_image(work / f"synthetic-{i}.png", size=(1024 - 64 * (i % 8), 880 + 32 * (i % 8)), seed=i)
            for i in range(count)]


def run_bench(bundle_dir: Path, out_dir: Path, images: list[Path] | None = None, combos: str | None = None,
              reps: int = 3, warmup: int = 1, threads: int | None = None, new_tokens: int = 32,
              scaling: tuple[int, ...] = (1,), scaling_combos: str | None = None, reference: Path | None = None,
              reference_tokens: int = 8, n_ctx: int | None = 4096, note: str | None = None, progress: bool = True,
              timeout_s: float = 3600, study: Path | None = None, series: str | None = None,
              windowing: str = "notebook", encode_batch: int | None = None) -> dict[str, Any]:
    """Run the benchmark and write bench.json, bench.md and PNG plots into `out_dir`; returns the results.

    With `study` (a DICOM series), `scaling` counts slices of it, asked as Google's CT notebook does
    (measure/study_bench.py); `n_ctx` None then sizes the context for the largest count.
    """
    from tqdm import tqdm

    from medgemma_edge.measure.hardware import fingerprint

    if reference is not None and not (Path(reference) / "config.json").is_file():
        raise UserError(f"{reference}: not a checkpoint folder (no config.json); pass the checkpoint the bundle "
                        f"was converted from")
    bundle = open_bundle(bundle_dir)
    chosen = parse_combos(combos, bundle, reference) if combos else default_combos(bundle, reference)
    scaled = parse_combos(scaling_combos, bundle, reference) if scaling_combos else chosen
    used = {(k, i) for c in chosen + scaled for k, i in (("encoder", c.encoder), ("decoder", c.decoder)) if i}
    if not bundle.has_vision and (images or tuple(scaling) != (1,)):
        raise UserError(f"{bundle.dir}: a text-only bundle (no vision part) is benchmarked on text alone; drop "
                        f"--image and --scaling")
    bundle.verify([bundle.find(k, i) for k, i in sorted(used)])  # once here; workers load unverified
    out_dir.mkdir(parents=True, exist_ok=True)
    if study is not None:
        paths = []  # the study's slices, rendered below
    elif bundle.has_vision:
        paths = bench_images(list(images or []), out_dir / "inputs", max(scaling))
    else:
        paths, scaling = [], (0,)  # rows of text-only questions: no image per question
    slice_sets: dict[int, list[Path]] = {}
    study_info = None
    prompt = PROMPT if bundle.has_vision else TEXT_PROMPT
    if study is not None:
        from medgemma_edge.measure.study_bench import study_context, study_inputs
        from medgemma_edge.runtime.study_prompt import NOTEBOOK_QUESTION

        if images:
            raise UserError("--study and --image are two kinds of input; pass one of them")
        slice_sets, study_info = study_inputs(study, out_dir / "inputs", tuple(scaling),
                                              int(bundle.config["vision"]["image_size"]), series, windowing)
        prompt, paths = NOTEBOOK_QUESTION, []
        n_ctx = n_ctx or study_context(bundle.config, max(scaling), prompt, FOLLOWUP, SYSTEM, new_tokens)
    base = {"bundle": str(bundle.dir), "threads": threads, "n_ctx": n_ctx or 4096, "new_tokens": new_tokens,
            "reference": str(reference) if reference else None, "reference_tokens": reference_tokens,
            "prompt": prompt, "followup": FOLLOWUP, "system": SYSTEM, "volume": study is not None,
            "encode_batch": encode_batch}
    plan = [(n, r, c) for n in scaling for r in range(warmup + reps)
            for c in _rotate(chosen if n == min(scaling) else scaled, r)]
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    errors: list[str] = []
    bar = tqdm(plan, desc="bench", unit="run", disable=not progress, file=sys.stderr)
    t_start = time.time()
    for n, r, combo in bar:
        bar.set_postfix_str(f"{combo.label}, {n} image{'s' * (n > 1)}, {'warm-up' if r < warmup else f'rep {r - warmup + 1}'}")
        inputs = slice_sets[n] if study is not None else paths[:n]
        result = _worker(combo, {**base, "images": [str(p) for p in inputs]}, timeout_s)
        result.update(round=r, warmup=r < warmup)
        runs.setdefault((n, combo.label), []).append(result)
        if "error" in result:
            errors.append(f"{combo.label} ({n} image(s), round {r}): {result['error']}")
            log.warning("%s", errors[-1])
    rows = []
    for (n, label), results in runs.items():
        measured = [x for x in results if not x["warmup"] and "error" not in x]
        rows.append({"combo": label, "n_images": n, "stats": summarize(measured), "runs": results})
    result_doc = {
        "bundle": str(bundle.dir), "bundle_id": bundle.manifest_sha256, "config": bundle.config,
        "source": (bundle.manifest.get("source") or {}).get("path"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)), "wall_s": time.time() - t_start,
        "settings": {**{k: v for k, v in base.items() if k != "bundle"}, "reps": reps, "warmup": warmup,
                     "scaling": list(scaling), "images": [str(p) for p in paths],
                     "synthetic_images": not images and bundle.has_vision and study is None, "note": note,
                     "study": str(study) if study is not None else None},
        "hardware": fingerprint(), "rows": rows, "errors": errors,
    }
    from medgemma_edge.measure.report import add_comparisons, write_report

    add_comparisons(result_doc)
    if study_info is not None:
        from medgemma_edge.measure.study_bench import add_study_analysis

        add_study_analysis(result_doc, study_info)
    write_report(result_doc, out_dir)
    return result_doc


def _rotate(items: list[Combo], k: int) -> list[Combo]:
    k %= max(len(items), 1)
    return items[k:] + items[:k]
