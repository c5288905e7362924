"""`medgemma-edge validate`: the doorway to convert/validate.py, and the report it leaves in the bundle.

Torch-free: the measuring happens in `convert.fidelity.validate` (the `convert` extra), imported on demand.
The report (report.json, report.md, fidelity.png) goes into `BUNDLE/validation/<timestamp>/` and is
listed under the manifest's top-level "reports"; files first, manifest last (temp + os.replace), so
every manifest a reader can see lists files that exist with the hashes it records.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from medgemma_edge.bundle import MANIFEST, open_bundle, write_manifest
from medgemma_edge.errors import UserError
from medgemma_edge.fsutil import publishing_dir, sha256_file

log = logging.getLogger(__name__)

REPORT_DIR = "validation"
PLOT = "fidelity.png"


class ThresholdFailed(UserError):
    """An artifact measured outside its precision's bound; the report is written all the same."""

    exit_code = 4


def validate_bundle(bundle_dir: str | Path, reference: str | Path, images: str | Path | None = None,
                    prompts: str | Path | None = None, max_new_tokens: int = 16, artifacts: list[str] | None = None,
                    progress: bool = True, force: bool = False) -> tuple[dict[str, Any], Path]:
    """Measure, then store the report in the bundle; returns (report, its folder). See convert.fidelity.validate."""
    from medgemma_edge.extras import require_convert_extra

    require_convert_extra()
    if importlib.util.find_spec("matplotlib") is None:  # checked now, not after an hour of measuring
        raise UserError("validate draws its plot with matplotlib, which is not installed: "
                        "pip install 'medgemma-edge[bench]'")
    from convert.fidelity.validate import validate

    report = validate(Path(bundle_dir), Path(reference), Path(images) if images else None,
                      Path(prompts) if prompts else None, max_new_tokens, artifacts, progress, force)
    return report, store(Path(bundle_dir), report)


# -- markdown ----------------------------------------------------------------------------------------
def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _decisive(part: dict[str, Any]) -> str:
    """Margin-aware top-1 (agreement where the reference's margin exceeds twice our error) and that share."""
    if part.get("decisive_share") is None:
        return "-"  # a report written before the figure existed
    agree = part.get("decisive_top1")
    return f"{'-' if agree is None else f'{agree:.3f}'} at {part['decisive_share']:.0%}"


def _verdict(row: dict[str, Any]) -> str:
    if not row["passed"]:
        return "FAIL: " + "; ".join(c["figure"] for c in row["checks"] if c["passed"] is False)
    ties = [c["figure"] for c in row["checks"] if c.get("near_tie")]
    bounded = [c for c in row["checks"] if c["passed"] is not None and c["figure"] != "token ids match transformers"]
    verdict = "pass" if bounded else "no threshold"
    return verdict + (f" ({', '.join(ties)}: near ties)" if ties else "")


def to_markdown(report: dict[str, Any]) -> str:
    ref, inputs = report["reference"], report["inputs"]
    n_image = sum(1 for c in inputs["cases"] if c["image"])
    lines = [
        f"# Fidelity report: {'PASSED' if report['passed'] else 'FAILED'}",
        "",
        f"Bundle `{report['bundle']['path']}` (manifest {report['bundle']['manifest_sha256'][:16]} before this report), "
        f"{report['created']}. Reference: {ref['model']}, `{ref['path']}` (sha256 {ref['sha256'][:16]}; "
        f"{'the checkpoint the bundle was converted from' if ref['same_as_bundle_source'] else 'NOT the checkpoint the bundle was converted from'}).",
        f"Inputs: {len(inputs['cases']) - n_image} text-only and {n_image} image+text prompts, system "
        f"\"{inputs['system']}\", {inputs['max_new_tokens']} greedy tokens each. KL is KL(reference || ours) per "
        "prompt position, averaged over positions; top-1 is argmax agreement; decisive is top-1 at the positions whose "
        "reference top-2 margin exceeds twice our largest logit error there (the rule the tests use), with their "
        "share of all positions. Each artifact is paired with the "
        f"most faithful partner (decoder {report['partners']['decoder']}, encoder {report['partners']['encoder'] or 'none'}). "
        "Bounds: medgemma_edge/bundle/precisions.py.",
        "",
    ]
    if report.get("note"):
        lines += [f"Note: {report['note']}", ""]
    decoders = [r for r in report["artifacts"] if r["kind"] == "decoder"]
    encoders = [r for r in report["artifacts"] if r["kind"] == "encoder"]
    if decoders:
        lines += ["| decoder | with encoder | text mean KL | text max KL | text top-1 | text decisive | image mean KL "
                  "| image max KL | image top-1 | image decisive | greedy exact | greedy prefix | verdict |",
                  "|---" * 13 + "|"]
        for r in decoders:
            t, i, g = r["text"] or {}, r["image"] or {}, r["greedy"]
            lines.append(f"| {r['artifact']} | {r['partner'] or '-'} | {_e(t.get('mean_kl'))} | {_e(t.get('max_kl'))} | "
                         f"{_f(t.get('top1'))} | {_decisive(t)} | {_e(i.get('mean_kl'))} | {_e(i.get('max_kl'))} | "
                         f"{_f(i.get('top1'))} | {_decisive(i)} | "
                         f"{g['exact']:.2f} | {g['prefix_mean']:.1f}/{g['reference_tokens_mean']:.1f} | {_verdict(r)} |")
        lines.append("")
    if encoders:
        lines += ["| encoder | with decoder | cosine worst token | cosine mean | max abs diff | image mean KL | "
                  "image top-1 | verdict |", "|---" * 8 + "|"]
        for r in encoders:
            f, i = r["features"], r["image"] or {}
            lines.append(f"| {r['artifact']} | {r['partner']} | {f['cosine_min']:.6f} | {f['cosine_mean']:.6f} | "
                         f"{f['max_abs']:.3g} | {_e(i.get('mean_kl'))} | {_f(i.get('top1'))} | {_verdict(r)} |")
        lines.append("")
    if report["failures"]:
        lines += ["Failed:", ""] + [f"- {f}" for f in report["failures"]] + [""]
    if report.get("near_ties"):
        lines += ["Near ties (a property of the weights, not a failure of the artifact): the top-1 floor is missed "
                  "while the KL bound holds, so every miss is at a position where the reference's own top-2 margin "
                  "is below twice our error there; random weights have many such positions, trained ones few.", ""]
        lines += [f"- {t}" for t in report["near_ties"]] + [""]
    if report["no_threshold"]:
        lines += ["No threshold (reported only): " + ", ".join(report["no_threshold"]) + ".", ""]
    lines.append(f"Plot: `{PLOT}`. Greedy figures: share of prompts whose whole answer matches the reference, and the "
                 "mean matching prefix / mean reference length in tokens (reported, no threshold).")
    return "\n".join(lines) + "\n"


# -- plot --------------------------------------------------------------------------------------------
def plot(report: dict[str, Any], path: Path) -> None:
    """Mean KL per decoder (log axis, with its bound) and 1 - worst-token cosine per encoder."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a workstation service or CI
    import matplotlib.pyplot as plt

    decoders = [r for r in report["artifacts"] if r["kind"] == "decoder"]
    encoders = [r for r in report["artifacts"] if r["kind"] == "encoder"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for k, (part, colour) in enumerate((("text", "tab:blue"), ("image", "tab:orange"))):
        xs = [i + 0.4 * k - 0.2 for i, r in enumerate(decoders) if r[part]]
        ys = [max(r[part]["mean_kl"], 1e-12) for r in decoders if r[part]]  # log axis: an exact 0 would vanish
        ax.bar(xs, ys, width=0.4, color=colour, label=f"{part} mean KL")
    _marks(ax, [next((c["bound"] for c in r["checks"] if c["figure"] == "text mean KL"), None) for r in decoders],
           "text bound")
    ax.set_yscale("log")
    ax.set_xticks(range(len(decoders)), [r["artifact"] for r in decoders], rotation=30, ha="right")
    ax.set_ylabel("KL(reference || ours), nats")
    ax.set_title("Decoders")
    if decoders:
        ax.legend(fontsize=8)
    ax = axes[1]
    ys = [max(1 - r["features"]["cosine_min"], 1e-9) for r in encoders]
    ax.bar(range(len(encoders)), ys, color="tab:green", label="1 - cosine (worst token)")
    floors = [next((c["bound"] for c in r["checks"] if c["figure"] == "cosine worst token"), None) for r in encoders]
    _marks(ax, [None if f is None else 1 - f for f in floors], "cosine floor")
    ax.set_yscale("log")
    ax.set_xticks(range(len(encoders)), [r["artifact"] for r in encoders], rotation=30, ha="right")
    ax.set_title("Encoders: image features vs transformers")
    if encoders:
        ax.legend(fontsize=8)
    fig.suptitle(f"Fidelity vs transformers fp32: {'passed' if report['passed'] else 'FAILED'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _marks(ax: Any, levels: list[float | None], label: str) -> None:
    """A dashed red threshold over each bar that has one; labelled once for the legend."""
    labelled = False
    for i, level in enumerate(levels):
        if level is not None:
            ax.hlines(level, i - 0.4, i + 0.4, colors="red", linestyles="--", label=None if labelled else label)
            labelled = True


# -- storing it in the bundle ---------------------------------------------------------------------------
def store(bundle_dir: Path, report: dict[str, Any]) -> Path:
    """Write the report files, then list them in the manifest atomically; returns their folder.

    The bundle id (the manifest's sha256) changes: the artifacts and their hashes do not.
    """
    bundle = open_bundle(bundle_dir)
    if bundle.manifest_sha256 != report["bundle"]["manifest_sha256"]:
        raise UserError(f"{bundle_dir / MANIFEST}: the bundle changed while it was being validated; run validate again")
    stamp = report["created"].replace("-", "").replace(":", "").replace("+0000", "Z")
    parent = bundle_dir / REPORT_DIR
    parent.mkdir(exist_ok=True)
    name, n = stamp, 1
    while (parent / name).exists():  # two runs within a second
        n += 1
        name = f"{stamp}-{n}"
    folder = parent / name
    with publishing_dir(folder) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(to_markdown(report), encoding="utf-8")
        plot(report, tmp / PLOT)
    entry = {
        "kind": "validation", "created": report["created"], "passed": report["passed"],
        "reference": {k: report["reference"][k] for k in ("path", "sha256", "same_as_bundle_source")},
        "files": [{"file": f"{REPORT_DIR}/{name}/{f}", "size": (folder / f).stat().st_size,
                   "sha256": sha256_file(folder / f)} for f in ("report.json", "report.md", PLOT)],
    }
    manifest = dict(bundle.manifest)  # every existing field kept, in order; "reports" added or updated
    reports = manifest.get("reports") if isinstance(manifest.get("reports"), list) else []
    old = [r for r in reports if isinstance(r, dict) and r.get("kind") == "validation"]
    manifest["reports"] = [r for r in reports if r not in old] + [entry]
    write_manifest(bundle_dir, manifest)
    _remove_old(bundle_dir, old, keep=folder)
    log.info("report in %s; the bundle id (manifest sha256) is now %s", folder, open_bundle(bundle_dir).manifest_sha256)
    return folder


def _remove_old(bundle_dir: Path, old: list[dict[str, Any]], keep: Path) -> None:
    """Previous reports' folders, now unlisted; only folders under validation/, never anything else."""
    root = (bundle_dir / REPORT_DIR).resolve()
    for entry in old:
        for f in entry.get("files") or []:
            folder = (bundle_dir / str(f.get("file", ""))).parent.resolve()
            if folder.parent == root and folder != keep.resolve() and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
