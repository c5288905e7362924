"""Ratios against the baselines, the issue's performance targets, and the bench's JSON/markdown/PNG output."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from medgemma_edge.errors import UserError
from medgemma_edge.runtime.generate import NOTICE

LLAMA = "llama.cpp:f16+q4_k_m"  # llama.cpp's own all-GGUF path
# the composed image paths the targets are about: each one measured gets its own row
COMPOSED = ("onnx:int8+gguf:q4_k_m", "ov:int8+gguf:q4_k_m", "ov:bf16+gguf:q4_k_m")
ALL_ONNX = ("onnx:int8+onnx:int4",)


class Target(NamedTuple):
    what: str
    combos: tuple[str, ...]
    metric: str
    against: str | None  # a combination for a ratio, None for an absolute limit (s or GB)
    limit: float
    op: str  # "<=" or ">="


# encode and TTFT from the vision-encoder issue (14), decode and follow-up from turn 1, all-ONNX from issue 13
TARGETS: tuple[Target, ...] = (
    Target("composed TTFT vs llama.cpp's all-GGUF path", COMPOSED, "ttft_ms", LLAMA, 0.40, "<="),
    Target("vision encode vs mtmd F16", COMPOSED, "image_encode_ms", LLAMA, 0.33, "<="),
    Target("decode tokens/s vs llama.cpp's own", COMPOSED, "decode_tokens_per_s", LLAMA, 0.95, ">="),
    Target("follow-up-question TTFT (s)", COMPOSED, "followup_ttft_ms", None, 5.0, "<="),
    Target("peak RSS, Q4_K_M + the encoder (GB)", COMPOSED, "peak_rss_mb", None, 4.0, "<="),
    Target("all-ONNX TTFT vs llama.cpp's all-GGUF path", ALL_ONNX, "ttft_ms", LLAMA, 0.5, "<="),
    Target("all-ONNX peak RSS (GB)", ALL_ONNX, "peak_rss_mb", None, 4.5, "<="),
)
RATIO_METRICS = ("ttft_ms", "image_encode_ms", "decode_tokens_per_s", "followup_ttft_ms", "peak_rss_mb")
COLUMNS = (("load_s", "load s", 1.0), ("image_encode_ms", "encode s", 1e-3),
           ("prefill_image_tokens_per_s", "prefill img tok/s", 1.0),
           ("prefill_text_tokens_per_s", "prefill text tok/s", 1.0), ("ttft_ms", "TTFT s", 1e-3),
           ("decode_tokens_per_s", "decode tok/s", 1.0), ("followup_ttft_ms", "follow-up TTFT s", 1e-3),
           ("peak_rss_mb", "peak RSS GB", 1 / 1024))


def _mean(row: dict[str, Any] | None, metric: str) -> float | None:
    stat = (row or {}).get("stats", {}).get(metric)
    return stat["mean"] if stat else None


def measured_or_first(combos: tuple[str, ...], present: Iterable[str]) -> list[str]:
    """The combos that were measured, in `combos`' order; none: the first alone, for one "not measured" row."""
    have = set(present)
    return [c for c in combos if c in have] or [combos[0]]


def add_comparisons(doc: dict[str, Any]) -> None:
    """Per row: ratios to each baseline at the same image count; per target: value, limit, pass."""
    rows = {(r["n_images"], r["combo"]): r for r in doc["rows"]}
    baselines = sorted({c for _, c in rows if c.startswith(("llama.cpp:", "transformers:"))})
    for (n, combo), row in rows.items():
        row["vs"] = {}
        if combo.startswith("transformers:"):
            continue  # the reference is what the others are compared to, not the other way round
        for b in baselines:
            if b == combo or (n, b) not in rows:
                continue
            ratios = {m: _mean(row, m) / _mean(rows[(n, b)], m)  # type: ignore[operator]
                      for m in RATIO_METRICS if _mean(row, m) and _mean(rows[(n, b)], m)}
            if ratios:
                row["vs"][b] = ratios
    n1 = min((n for n, _ in rows), default=1)
    doc["targets"] = []
    # the targets are about the composed image path: a text-only bundle has none to meet
    for t in TARGETS if doc["config"].get("vision") else ():
        for combo in measured_or_first(t.combos, (c for n, c in rows if n == n1)):
            value = _mean(rows.get((n1, combo)), t.metric)
            if value is not None and t.against is not None:
                other = _mean(rows.get((n1, t.against)), t.metric)
                value = value / other if other else None
            elif value is not None:
                value = value / 1e3 if t.metric.endswith("_ms") else value / 1024  # s, GB
            passed = None if value is None else (value <= t.limit if t.op == "<=" else value >= t.limit)
            doc["targets"].append({"target": t.what, "combination": combo, "against": t.against, "value": value,
                                   "limit": f"{t.op} {t.limit}", "passed": passed})


def _fmt(stat: dict[str, float] | None, scale: float) -> str:
    if not stat:
        return "-"
    m, sd = stat["mean"] * scale, stat["sd"] * scale
    digits = 2 if abs(m) < 10 else 1 if abs(m) < 1000 else 0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def markdown(doc: dict[str, Any]) -> str:
    hw, s = doc["hardware"], doc["settings"]
    cpu = hw.get("cpu") or {}
    gpus = ", ".join(g.get("name", "?") for g in hw.get("gpus") or []) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in (hw.get("versions") or {}).items())
    cfg = doc["config"]
    lines = [
        f"# medgemma-edge bench: {Path(doc['bundle']).name}", "",
        f"- hardware: {cpu.get('model')}, {cpu.get('logical_cores')} logical cores, {hw.get('ram_gb')} GB RAM, "
        f"GPU: {gpus}; {hw.get('os')}",
        f"- SIMD: {' '.join(cpu.get('flags') or [])}",
        f"- versions: {versions}",
        f"- model: {cfg['text']['num_layers']} decoder layers, hidden {cfg['text']['hidden_size']}, "
        + (f"{cfg['vision']['image_size']} px, {cfg['tokens_per_image']} tokens/image" if cfg.get("vision")
           else "text-only (no vision part)") + f"; converted from {doc['source']}",
        *([f"- note: {s['note']}"] if s.get("note") else []),
        f"- {s['warmup']} warm-up + {s['reps']} measured rounds, combinations alternated and rotated each round, "
        f"each run a fresh process; threads {s['threads'] or 'default'}; {s['new_tokens']} new tokens "
        f"(EOS ignored; transformers: {s['reference_tokens']}); context {s['n_ctx']}",
        f"- images: {'synthetic chest-film-like PNGs' if s['synthetic_images'] else ', '.join(s['images']) or 'none'}; "
        f"figures are mean ± sd over the measured rounds", "",
    ]
    for n in sorted({r["n_images"] for r in doc["rows"]}):
        what = "slice" if doc.get("study") else "image"
        lines += [f"## {n} {what}{'s' * (n > 1)} per question" if n else "## Text-only questions", "",
                  "| combination | " + " | ".join(c[1] for c in COLUMNS) + " | other procs (cores, max) |",
                  "|---" * (len(COLUMNS) + 2) + "|"]
        for r in (r for r in doc["rows"] if r["n_images"] == n):
            busy = [x.get("other_cores") for x in r["runs"] if not x.get("warmup") and x.get("other_cores") is not None]
            lines.append(f"| {r['combo']} | " + " | ".join(_fmt(r["stats"].get(k), sc) for k, _, sc in COLUMNS)
                         + (f" | {max(busy):.2f} |" if busy else " | - |"))
        lines.append("")
    ratios = [(r["combo"], b, v) for r in doc["rows"] if r["n_images"] == min(x["n_images"] for x in doc["rows"])
              for b, v in r.get("vs", {}).items()]
    if ratios:
        lines += ["## Ratios to the baselines (mean / mean; < 1 is faster or smaller, except decode)", "",
                  "| combination | vs | TTFT | encode | decode tok/s | follow-up TTFT | peak RSS |", "|---" * 7 + "|"]
        lines += [f"| {c} | {b} | " + " | ".join(f"{v[m]:.2f}" if m in v else "-" for m in RATIO_METRICS) + " |"
                  for c, b, v in ratios]
        lines.append("")
    lines += (doc.get("study") or {}).get("markdown", [])  # bench --study: measure/study_bench.py
    if doc.get("targets"):
        lines += ["## Targets", "", "| target | value | limit | met |", "|---|---|---|---|"]
        for t in doc["targets"]:
            val = "not measured" if t["value"] is None else f"{t['value']:.2f}"
            met = "-" if t["passed"] is None else ("yes" if t["passed"] else "**no**")
            lines.append(f"| {t['target']} ({t['combination']}" + (f" / {t['against']}" if t["against"] else "")
                         + f") | {val} | {t['limit']} | {met} |")
        lines.append("")
    if doc["errors"]:
        lines += ["## Failed runs", ""] + [f"- {e}" for e in doc["errors"]] + [""]
    lines += [f"_{NOTICE}_", ""]
    return "\n".join(lines)


def plots(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UserError("bench plots need matplotlib: pip install 'medgemma-edge[bench]'") from exc
    written = []
    n1 = min(r["n_images"] for r in doc["rows"])
    rows = [r for r in doc["rows"] if r["n_images"] == n1 and r["stats"]]
    if rows:
        fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * len(rows) + 2), sharey=True)
        labels = [r["combo"] for r in rows]
        left = [0.0] * len(rows)
        for metric, name in (("image_encode_ms", "image encode"), ("ttft_ms", "prefill + first token")):
            vals = [(_mean(r, metric) or 0.0) / 1e3 for r in rows]
            width = [v - (l if metric == "ttft_ms" else 0.0) for v, l in zip(vals, left)]
            axes[0].barh(labels, width, left=left if metric == "ttft_ms" else None, label=name)
            left = vals
        axes[0].set_xlabel("seconds to first token (stacked by stage)")
        axes[0].legend(loc="lower right")
        for ax, metric, name, scale in ((axes[1], "decode_tokens_per_s", "decode tokens/s", 1.0),
                                        (axes[2], "peak_rss_mb", "peak RSS (GB)", 1 / 1024)):
            ax.barh(labels, [(_mean(r, metric) or 0.0) * scale for r in rows],
                    xerr=[r["stats"].get(metric, {}).get("sd", 0.0) * scale for r in rows])
            ax.set_xlabel(name)
        fig.suptitle(f"{Path(doc['bundle']).name}: {n1} image(s), {doc['hardware'].get('cpu', {}).get('model')}")
        fig.tight_layout()
        written.append(out_dir / "bench-stages.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    counts = sorted({r["n_images"] for r in doc["rows"]})
    if len(counts) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for combo in sorted({r["combo"] for r in doc["rows"] if r["n_images"] != n1}):
            pts = sorted((r["n_images"], r) for r in doc["rows"] if r["combo"] == combo and r["stats"])
            for ax, metric in zip(axes, ("image_encode_ms", "ttft_ms")):
                ax.errorbar([n for n, _ in pts], [(_mean(r, metric) or 0.0) / 1e3 for _, r in pts],
                            yerr=[r["stats"].get(metric, {}).get("sd", 0.0) / 1e3 for _, r in pts],
                            marker="o", label=combo, capsize=3)
        for ax, name in zip(axes, ("image encode (s)", "time to first token (s)")):
            ax.set_xlabel("slices per question" if doc.get("study") else "images per question")
            ax.set_xticks(counts)
            ax.set_ylabel(name)
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "bench-scaling.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_report(doc: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / "bench.md").write_text(markdown(doc))
    doc["plots"] = [p.name for p in plots(doc, out_dir)]
    (out_dir / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
