"""`bench`, `validate` and `doctor`: how fast and how faithful, on this machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from medgemma_edge.cli.app import EPILOG, cli
from medgemma_edge.cli.options import MAX_CTX, MAX_THREADS, whole
from medgemma_edge.errors import UserError
from medgemma_edge.runtime.sampling import MAX_NEW_TOKENS


@cli.command(epilog=EPILOG)
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="Bundle folder from `convert`.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="Image (PNG/JPEG/DICOM, repeatable; default: synthetic chest-film-like images).")
@click.option("--combos", default=None,
              help="ENCODER+DECODER list, e.g. onnx:int8+gguf:q4_k_m,llama.cpp:f16+q4_k_m,transformers:fp32 "
                   "(default: every encoder with the default decoder, every decoder with the default encoder, "
                   "and the baselines; a text-only bundle: decoders alone, e.g. gguf:q4_k_m,transformers:fp32).")
@click.option("--reps", default=3, show_default=True, type=whole(1, 1000), help="Measured rounds.")
@click.option("--warmup", default=1, show_default=True, type=whole(0, 100), help="Discarded rounds first.")
@click.option("--threads", default=None, type=whole(1, MAX_THREADS), help="CPU threads for every backend (default: theirs).")
@click.option("--new-tokens", default=32, show_default=True, type=whole(2, MAX_NEW_TOKENS), help="Tokens decoded per answer (EOS ignored).")
@click.option("--scaling", default="1", show_default=True, help="Images per question to measure, e.g. 1,2,4.")
@click.option("--scaling-combos", default=None, help="Combinations measured with more than one image (default: all).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="The checkpoint the bundle came from: adds the transformers fp32 baseline (needs the convert extra).")
@click.option("--reference-tokens", default=8, show_default=True, type=whole(2, 1024), help="Tokens transformers decodes.")
@click.option("--ctx", "n_ctx", default=4096, show_default=True, type=whole(64, MAX_CTX), help="Context length in tokens.")
@click.option("--note", default=None, help="A line for the report (e.g. 'synthetic weights').")
@click.option("--out", "out_dir", default=Path("bench-results"), show_default=True, type=click.Path(path_type=Path),
              help="Folder for bench.json, bench.md and the PNG plots.")
@click.option("--study", type=click.Path(path_type=Path), default=None,
              help="A DICOM series: --scaling then counts its slices (e.g. 1,4,16,85), asked as Google's CT notebook.")
@click.option("--series", default=None, help="Which series of --study (index or id from `study-info`).")
@click.option("--windowing", type=click.Choice(["notebook", "serving"]), default="notebook", show_default=True,
              help="CT window preset of --study (see `run --help`).")
@click.option("--encode-batch", type=whole(1, 64), default=None,
              help="Images per ONNX encoder call (default: chosen from available memory).")
def bench(bundle_dir: Path, images: tuple[Path, ...], scaling: str, out_dir: Path, **kw: Any) -> None:
    """Time every encoder/decoder combination on this machine, next to llama.cpp's own path (and transformers).

    \b
    Per combination: load time, image encode, prefill tokens/s (image and text apart), time to first
    token, decode tokens/s, follow-up-question TTFT (cached image) and peak RSS, as mean ± sd over
    --reps rounds after --warmup rounds. Each run is a fresh process; combinations alternate.
    Example:
      medgemma-edge bench --bundle B --combos onnx:int8+gguf:q4_k_m,llama.cpp:f16+q4_k_m --reps 5
    """
    from medgemma_edge.measure.bench import run_bench

    try:
        counts = tuple(sorted({int(n) for n in scaling.split(",") if n.strip()}))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise UserError(f"--scaling {scaling!r}: give image counts such as 1,2,4")
    if kw["study"] is not None and click.get_current_context().get_parameter_source("n_ctx").name == "DEFAULT":
        kw["n_ctx"] = None  # sized for the largest slice count
    doc = run_bench(bundle_dir, out_dir, images=list(images), scaling=counts, **kw)
    click.echo((out_dir / "bench.md").read_text())
    click.echo(f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}" +
               "".join(f", {out_dir / p}" for p in doc.get("plots", [])), err=True)
    if doc["errors"]:
        raise UserError(f"{len(doc['errors'])} run(s) failed, first: {doc['errors'][0]}")


@cli.command("validate", epilog=EPILOG)
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="Bundle folder to validate.")
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="The Hugging Face checkpoint folder the bundle was converted from (run in transformers, fp32).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of PNG/JPEG/DICOM images (default: a built-in synthetic chest film).")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="Text file, one prompt per line, or a JSON list (default: 3 built-in prompts).")
@click.option("--max-new-tokens", default=16, show_default=True, type=whole(1, 1024),
              help="Greedy tokens compared per prompt.")
@click.option("--artifacts", default="", help="Only these, e.g. gguf:q4_k_m,encoder:onnx:int8 (default: all).")
@click.option("--force", is_flag=True, help="Load artifacts even if the memory estimate exceeds what is available.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of markdown.")
def validate_cmd(bundle_dir: Path, reference: Path, images: Path | None, prompts: Path | None, max_new_tokens: int,
                 artifacts: str, force: bool, as_json: bool) -> None:
    """Measure every artifact against transformers fp32 and store the report in the bundle.

    \b
    Per decoder: mean/max KL and top-1 over the prompt positions (text and image
    prompts) and greedy-answer agreement; per encoder: image-feature cosine.
    The report goes to BUNDLE/validation/<time>/ and is listed in manifest.json
    (which changes the bundle id; artifacts are untouched). Each prompt is asked
    text-only and each image once. The reference needs ~4.3 GB per billion
    parameters of memory; it is freed before the artifacts load.
    Exit codes: 0 every threshold passed; 4 a threshold failed (report written,
    failures on stderr); 2 bad input; 3 an artifact's sha256 differs.
    """
    from medgemma_edge.measure.validation_report import ThresholdFailed, validate_bundle

    names = [a.strip() for a in artifacts.split(",") if a.strip()]
    report, folder = validate_bundle(bundle_dir, reference, images, prompts, max_new_tokens, names or None,
                                     force=force)
    click.echo(json.dumps(report, indent=2) if as_json else (folder / "report.md").read_text(encoding="utf-8"))
    click.echo(f"report: {folder}", err=True)
    if not report["passed"]:
        for line in report["failures"]:
            click.echo(f"FAIL {line}", err=True)
        raise ThresholdFailed(f"{bundle_dir}: {len(report['failures'])} fidelity check(s) failed; see {folder / 'report.md'}")


@cli.command(epilog=EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print the hardware fingerprint and advice as one JSON object.")
def doctor(as_json: bool) -> None:
    """Show the hardware, the loaded llama.cpp and ONNX Runtime backends, and what to install for a GPU."""
    from medgemma_edge.measure.doctor import diagnose, render

    result = diagnose()
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(render(result)))
