"""`bench --study`: the same rounds as `bench`, with a CT/MR volume's slices instead of single images.

For each slice count of `--scaling` (e.g. 1,4,16,85) the study is sampled as Google's CT notebook does
(`int(round(i / n * (N - 1)))`, i = 1..n), rendered once here at the encoder's size (lossless PNGs, so
every combination, and llama.cpp's own path, gets the same pixels), and asked as the notebook's volume
prompt. The analysis adds, per combination, the per-slice cost slope and where cost stops growing
linearly, and the issue's study targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medgemma_edge.measure.report import COMPOSED, LLAMA, measured_or_first

BEND = 1.25  # a marginal per-slice cost this many times the first one is where the curve bends
STUDY_TARGETS = (  # (what, metric, slices, compared to, limit)
    ("16-slice TTFT vs llama.cpp's own path on the same slices", "ttft_ms", 16, LLAMA, 0.45),
    ("peak RSS at 85 slices, Q4_K_M + the encoder (GB)", "peak_rss_mb", 85, None, 6.0),
    ("per-slice encode with batching vs one single-image encode", "image_encode_ms", -1, "single", 0.9),
)


def study_inputs(study: Path, out: Path, counts: tuple[int, ...], image_size: int, series: str | None,
                 preset: str) -> tuple[dict[int, list[Path]], dict[str, Any]]:
    """PNG slices per count (out/slices-N/SLICE_001.png, ...), and what was read (no PHI)."""
    from PIL import Image

    from medgemma_edge.inputs.slices import render_volume
    from medgemma_edge.inputs.volumes import load_volume, sample_indices

    _, volume = load_volume(study, series)
    paths: dict[int, list[Path]] = {}
    for n in counts:
        folder = out / f"slices-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        rendered = render_volume(volume, sample_indices(len(volume.slices), n), image_size, preset)
        paths[n] = []
        for k, r in enumerate(rendered, 1):
            paths[n].append(folder / f"SLICE_{k:03d}.png")
            Image.fromarray(np.asarray(r.image)).save(paths[n][-1])
    s = volume.series
    info = {"modality": s.modality, "orientation": s.orientation, "slices_in_series": len(volume.slices),
            "size": f"{s.slices[0].cols}x{s.slices[0].rows}", "order": volume.order, "windowing": preset}
    return paths, info


def _mean(rows: dict[tuple[int, str], dict[str, Any]], n: int, combo: str, metric: str) -> float | None:
    stat = (rows.get((n, combo)) or {}).get("stats", {}).get(metric)
    return stat["mean"] if stat else None


def scaling(doc: dict[str, Any]) -> dict[str, Any]:
    """Per combination: seconds per slice (least-squares slope) of encode and TTFT, the marginal cost between
    neighbouring counts, and the first count where the marginal TTFT bends above BEND x the first one."""
    rows = {(r["n_images"], r["combo"]): r for r in doc["rows"]}
    out: dict[str, Any] = {}
    for combo in sorted({c for _, c in rows}):
        pts = sorted((n, _mean(rows, n, combo, "ttft_ms"), _mean(rows, n, combo, "image_encode_ms"))
                     for n, c in rows if c == combo)
        pts = [(n, t / 1e3, e / 1e3) for n, t, e in pts if t is not None and e is not None]
        if len(pts) < 2:
            continue
        ns = np.array([p[0] for p in pts], float)
        ttft, enc = np.array([p[1] for p in pts]), np.array([p[2] for p in pts])
        marginal = list(np.diff(ttft) / np.diff(ns))
        # the first rising segment is the reference (the first one can fall: 1 slice pays one-time costs)
        first = next((i for i, m in enumerate(marginal) if m > 0), None)
        bend = None if first is None else next(
            (int(ns[i + 1]) for i in range(first + 1, len(marginal)) if marginal[i] > BEND * marginal[first]), None)
        out[combo] = {"slices": ns.astype(int).tolist(), "ttft_s_per_slice": float(np.polyfit(ns, ttft, 1)[0]),
                      "encode_s_per_slice": float(np.polyfit(ns, enc, 1)[0]),
                      "marginal_ttft_s_per_slice": [round(float(m), 3) for m in marginal],
                      "encode_s_per_slice_at": {int(n): round(e / n, 3) for n, e in zip(ns, enc)},
                      "bends_at": bend, "linear": bend is None}
    return out


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The study targets, one row per composed path measured (one "not measured" row when none was)."""
    rows = {(r["n_images"], r["combo"]): r for r in doc["rows"]}
    counts = sorted({n for n, _ in rows})
    combos = measured_or_first(COMPOSED, (c for _, c in rows))
    out = []
    for what, metric, n, against, limit in STUDY_TARGETS:
        for combo in combos:
            value = None
            if against == "single":  # per-slice encode at the largest count over the 1-slice encode
                big, one = _mean(rows, counts[-1], combo, metric), _mean(rows, 1, combo, metric)
                value = big / counts[-1] / one if big and one and counts[-1] > 1 else None
            elif against is not None:
                ours, theirs = _mean(rows, n, combo, metric), _mean(rows, n, against, metric)
                value = ours / theirs if ours and theirs else None
            else:
                ours = _mean(rows, n, combo, metric)
                value = ours / 1024 if ours else None
            out.append({"target": what, "combination": combo, "against": None if against == "single" else against,
                        "value": value, "limit": f"<= {limit}", "passed": None if value is None else value <= limit})
    return out


def add_study_analysis(doc: dict[str, Any], info: dict[str, Any]) -> None:
    doc["study"] = {**info, "scaling": scaling(doc)}
    doc["targets"] = targets(doc)
    doc["study"]["markdown"] = markdown_lines(doc)


def markdown_lines(doc: dict[str, Any]) -> list[str]:
    study = doc.get("study")
    if not study:
        return []
    lines = [f"## Study scaling ({study['modality']} {study['orientation']}, {study['slices_in_series']} slices of "
             f"{study['size']}, sampled as Google's CT notebook, windowing {study['windowing']})", "",
             "| combination | TTFT s/slice | encode s/slice | marginal TTFT s/slice | encode s/slice at each count "
             "| linear? |", "|---|---|---|---|---|---|"]
    for combo, s in study["scaling"].items():
        at = ", ".join(f"{n}: {v:g}" for n, v in s["encode_s_per_slice_at"].items())
        bend = "yes" if s["linear"] else f"bends at {s['bends_at']} slices"
        lines.append(f"| {combo} | {s['ttft_s_per_slice']:.3f} | {s['encode_s_per_slice']:.3f} | "
                     f"{', '.join(f'{m:g}' for m in s['marginal_ttft_s_per_slice'])} | {at} | {bend} |")
    return lines + [""]


def study_context(config: dict[str, Any], n_slices: int, prompt: str, followup: str, system: str | None,
                  new_tokens: int) -> int:
    """The context the largest count needs: the volume prompt, the answer, then the follow-up turn."""
    from medgemma_edge.runtime.studies import StudyTurn
    from medgemma_edge.runtime.study_prompt import volume_content

    turn = StudyTurn(volume_content(prompt, n_slices), [], [])
    follow = len(f"<end_of_turn>\n<start_of_turn>user\n{followup}<end_of_turn>\n<start_of_turn>model\n".encode())
    return turn.n_ctx(int(config["tokens_per_image"]), 2 * new_tokens + follow + 8, system)
