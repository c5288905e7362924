"""`run_eval`: score a question set with several artifacts, then compare them on the same items.

Each target (an encoder+decoder of a bundle, or a decoder GGUF) scores every item into `OUT/items.jsonl`
(the batch engine: resumable, local or Ray); `summarise` then reads the lines back:
- per target and method, accuracy with its 95% Wilson interval (datasets/stats.py). Methods: `loglik` and
  `generated` for multiple-choice items (datasets/scoring.py says how each is scored), `exact` and
  `normalised` for free-text items with a reference answer;
- per other target and method, the exact McNemar test against the reference target (the most faithful one:
  `reference`, else the first by the precision table's fidelity order, else the first given), on the items
  both scored: b = only the reference right, c = only the other right; p < 0.05 says they differ beyond noise.
Items whose line is an error count in `errors`, not in any accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from medgemma_edge.bundle.precisions import FAITHFUL_ORDER
from medgemma_edge.datasets.batch import run_job
from medgemma_edge.datasets.plan import EngineOptions
from medgemma_edge.datasets.items import Item
from medgemma_edge.datasets.jobs import Job, Target
from medgemma_edge.datasets.results import ResultLog
from medgemma_edge.datasets.stats import mcnemar, wilson
from medgemma_edge.errors import UserError

log = logging.getLogger(__name__)

METHODS = {"loglik": "correct_loglik", "generated": "correct_generated", "exact": "exact_match",
           "normalised": "normalised_match"}
PREDICTIONS = {"loglik": "pred_loglik", "generated": "pred_generated"}
ALPHA = 0.05
RESULTS = "items.jsonl"


def reference_label(targets: Sequence[Target], asked: str | None = None) -> str:
    """The target the others are compared with: `asked`, else the most faithful by the precision table."""
    labels = [t.label for t in targets]
    if asked is not None:
        if asked not in labels:
            raise UserError(f"--reference {asked}: not among the artifacts evaluated ({', '.join(labels)})")
        return asked
    order = {a: i for i, a in enumerate(FAITHFUL_ORDER["decoder"])}
    enc_order = {a: i for i, a in enumerate(FAITHFUL_ORDER["encoder"])}
    ranked = sorted(range(len(targets)), key=lambda i: (order.get(str(targets[i].decoder), len(order)),
                                                       enc_order.get(str(targets[i].encoder), len(enc_order)), i))
    return labels[ranked[0]]


def run_eval(targets: Sequence[Target], items: Sequence[Item], out_dir: Path | str, *, reference: str | None = None,
             options: EngineOptions | None = None, retry_errors: bool = False, progress: bool = True,
             **job_kw: Any) -> dict[str, Any]:
    """Score `items` with every target (resuming what `out_dir` already holds) and write the report there."""
    from medgemma_edge.datasets.eval_report import write_report

    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise UserError(f"an artifact is named twice ({', '.join(labels)}); name each once")
    ref = reference_label(targets, reference)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [Job.make("score", t, **job_kw) for t in targets]  # every identity resolved before the first load
    keys: dict[str, dict[str, str]] = {}
    summaries = {}
    for job in jobs:
        summary = run_job(job, items, out / RESULTS, options, retry_errors=retry_errors, progress=progress)
        log.info("%s: %s", job.target.label, summary.line())
        keys[job.target.label] = summary.keys
        summaries[job.target.label] = summary.to_json()
    with ResultLog(out / RESULTS) as results:
        by_key = {r["key"]: r for _, r in results.records()}
    records = {label: {item_id: by_key[k] for item_id, k in ks.items() if k in by_key} for label, ks in keys.items()}
    report = summarise(records, [i.id for i in items], ref)
    report["targets"] = {job.target.label: {"model": job.model, "run": summaries[job.target.label]} for job in jobs}
    report["sampling"] = jobs[0].sampling.to_json()
    write_report(report, out)
    return report


def summarise(records: dict[str, dict[str, dict[str, Any]]], item_ids: Sequence[str], ref: str) -> dict[str, Any]:
    """Accuracy per target and method, and McNemar against `ref`, from each target's lines by item id."""
    rows = []
    for label, recs in records.items():
        ok = {i: r for i, r in recs.items() if r.get("status") == "ok"}
        row: dict[str, Any] = {"artifact": label, "items": len(item_ids), "scored": len(ok),
                               "errors": sum(1 for r in recs.values() if r.get("status") != "ok"), "methods": {}}
        for method, field in METHODS.items():
            marks = [bool(r[field]) for i in item_ids if (r := ok.get(i)) is not None and field in r]
            if marks:
                w = wilson(sum(marks), len(marks))
                row["methods"][method] = {"correct": w.k, "n": w.n, "accuracy": w.p, "ci95": [w.low, w.high]}
        rows.append(row)
    paired = []
    base = {i: r for i, r in records.get(ref, {}).items() if r.get("status") == "ok"}
    for label, recs in records.items():
        if label == ref:
            continue
        for method, field in METHODS.items():
            both = [i for i in item_ids if i in base and field in base[i] and recs.get(i, {}).get("status") == "ok"
                    and field in recs[i]]
            if not both:
                continue
            test = mcnemar([bool(base[i][field]) for i in both], [bool(recs[i][field]) for i in both])
            entry: dict[str, Any] = {"artifact": label, "reference": ref, "method": method, "n": len(both),
                                     "b_reference_only": test.b, "c_other_only": test.c, "p_value": test.p_value,
                                     "differs": test.p_value < ALPHA}
            pred = PREDICTIONS.get(method)
            if pred is not None:
                entry["same_prediction"] = sum(base[i].get(pred) == recs[i].get(pred) for i in both) / len(both)
            paired.append(entry)
    return {"reference": ref, "alpha": ALPHA, "items": len(item_ids), "artifacts": rows, "paired": paired}


def bundle_targets(bundle: str, artifacts: Sequence[str], base: Target) -> list[Target]:
    """`gguf:q4_k_m` (with the default encoder) or `onnx:int8+gguf:q4_k_m` -> targets over `bundle`."""
    out = []
    for text in artifacts:
        enc, _, dec = text.rpartition("+")
        out.append(replace(base, bundle=bundle, decoder=dec, encoder=enc or base.encoder, name=text))
    return out
