"""The eval report: `eval.json` (everything), `eval.md` (the tables) and `eval.png` (accuracy with 95% Wilson
intervals; drawn when matplotlib, the `bench` extra, is installed). Each file is published atomically."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from medgemma_edge.fsutil import atomic_write
from medgemma_edge.runtime.generate import NOTICE

log = logging.getLogger(__name__)

METHOD_NAMES = {"loglik": "option log-likelihood", "generated": "generated letter", "exact": "exact match",
                "normalised": "normalised match"}


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    written = [out / "eval.json", out / "eval.md"]
    atomic_write(written[0], json.dumps(report, indent=2) + "\n")
    atomic_write(written[1], markdown(report))
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("no plot: matplotlib is not installed (pip install 'medgemma-edge[bench]'); eval.json and "
                    "eval.md are written")
    else:
        plot(report, out / "eval.png")
        written.append(out / "eval.png")
    return written


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(report: dict[str, Any]) -> str:
    methods = [m for m in METHOD_NAMES if any(m in r["methods"] for r in report["artifacts"])]
    lines = [f"# Evaluation: {report['items']} items", "", f"> {NOTICE}", "",
             "Accuracy in %, with the 95% Wilson interval; `errors`: items whose line is an error (not scored).", "",
             "| artifact | scored | errors | " + " | ".join(METHOD_NAMES[m] for m in methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for r in report["artifacts"]:
        cells = []
        for m in methods:
            s = r["methods"].get(m)
            cells.append("-" if s is None else f"{_pct(s['accuracy'])} [{_pct(s['ci95'][0])}, {_pct(s['ci95'][1])}] "
                                               f"({s['correct']}/{s['n']})")
        mark = " (reference)" if r["artifact"] == report["reference"] else ""
        lines.append(f"| `{r['artifact']}`{mark} | {r['scored']} | {r['errors']} | " + " | ".join(cells) + " |")
    if report["paired"]:
        lines += ["", f"Paired against `{report['reference']}` (exact McNemar test on the items both scored; "
                  f"b: only the reference right, c: only the other right):", "",
                  "| artifact | method | items | b | c | p | same prediction | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in report["paired"]:
            same = "-" if "same_prediction" not in p else f"{_pct(p['same_prediction'])}%"
            verdict = (f"differs (p < {report['alpha']})" if p["differs"] else "no evidence of a difference")
            lines.append(f"| `{p['artifact']}` | {METHOD_NAMES[p['method']]} | {p['n']} | {p['b_reference_only']} | "
                         f"{p['c_other_only']} | {p['p_value']:.3g} | {same} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    rows = report["artifacts"]
    methods = [m for m in METHOD_NAMES if any(m in r["methods"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) * max(len(methods), 1)), 4.5))
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for i, r in enumerate(rows):
            s = r["methods"].get(m)
            if s is None:
                continue
            xs.append(i - 0.4 + width * (k + 0.5))
            ys.append(s["accuracy"])
            lo.append(max(0.0, s["accuracy"] - s["ci95"][0]))  # rounding can put a bound a hair past the value
            hi.append(max(0.0, s["ci95"][1] - s["accuracy"]))
        ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=3, label=METHOD_NAMES[m])
    ax.set_xticks(range(len(rows)), [r["artifact"] + (" *" if r["artifact"] == report["reference"] else "")
                                     for r in rows], rotation=15, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.set_title(f"{report['items']} items; * = reference for the paired test")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
