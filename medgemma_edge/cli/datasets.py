"""`batch` and `eval`: a cohort through the model, resumable, locally or on Ray (medgemma_edge.datasets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from medgemma_edge.cli.app import EPILOG, cli
from medgemma_edge.cli.options import (MAX_CTX, answer_options, audit_log, cache_options, group, model_options,
                                       sampling, whole)
from medgemma_edge.errors import UserError
from medgemma_edge.inputs.slices import DEFAULT_WINDOWING, WINDOWINGS
from medgemma_edge.inputs.volumes import MAX_SLICES, SLICE_ORDERS

MAX_WORKERS = 4096

engine_options = group(
    click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                 help="local: this process; ray: a Ray cluster (the `cluster` extra), one loaded pipeline per actor."),
    click.option("--ray-address", default=None,
                 help="A running cluster: 'auto' or HEAD:PORT (default: a Ray instance on this machine, for this run)."),
    click.option("--workers", default=1, show_default=True, type=whole(1, MAX_WORKERS),
                 help="Ray actors, each holding one loaded pipeline (its memory, once per actor)."),
    click.option("--cpus-per-worker", default=1, show_default=True, type=whole(1, 1024),
                 help="CPUs Ray reserves for each actor; also its threads unless --threads is given."),
    click.option("--retry-errors", is_flag=True, help="Run again the items whose line is an error (the line is replaced)."),
    click.option("--raw", is_flag=True, help="No chat template (base, non-instruction models); no images."),
    click.option("--decoder-gguf", "decoder_ggufs", multiple=True, type=click.Path(path_type=Path),
                 help="Text-only: a Gemma 3 decoder GGUF instead of a bundle (eval: repeatable, one artifact each)."),
    click.option("--no-progress", is_flag=True, help="No progress bar on stderr (the summary is still printed)."),
)
study_batch_options = group(
    click.option("--max-slices", default=MAX_SLICES, show_default=True, type=whole(1, 512),
                 help="Study folders: at most this many slices, spread evenly as Google's CT notebook does."),
    click.option("--slice-order", type=click.Choice(SLICE_ORDERS), default="instance", show_default=True,
                 help="Study folders: instance (InstanceNumber) or geometry (position along the slice normal)."),
    click.option("--windowing", type=click.Choice(sorted(WINDOWINGS)), default=DEFAULT_WINDOWING, show_default=True,
                 help="Study folders: the CT windows (see `run --help`)."),
    click.option("--instruction", default=None, help="Study folders: text before the slices (default: the notebook's)."),
)


def _target(kw: dict[str, Any], with_images: bool, decoder_gguf: Path | None = None, decoder: str | None = None,
            encoder: str | None = None) -> Any:
    from medgemma_edge.datasets import Target

    from medgemma_edge.backends.onnx.session import provider_names

    # resolved here, so a provider this machine lacks is one line before any item runs
    asked = [p.strip() for p in (kw["providers"] or "").split(",") if p.strip()]
    providers = tuple(provider_names(asked)) if asked else None
    common = dict(n_ctx=kw["n_ctx"], n_threads=kw["threads"], providers=providers, verify=not kw["no_verify"],
                  force=kw["force"], memory_limit=None if kw["memory_limit"] is None else int(kw["memory_limit"] * 2**30),
                  cache_dir=str(kw["cache_dir"]) if kw["cache_dir"] else None,
                  cache_bytes=int(kw["cache_size_gb"] * 2**30))
    if decoder_gguf is not None:
        return Target(decoder_gguf=str(decoder_gguf), with_images=False, **common)
    if kw["bundle_dir"] is None:
        raise UserError("pass --bundle BUNDLE_DIR (a folder written by `medgemma-edge convert`) or --decoder-gguf FILE")
    return Target(bundle=str(kw["bundle_dir"]), decoder=decoder if decoder else kw["decoder"],
                  encoder=encoder if encoder else kw["encoder"], with_images=with_images, **common)


def _check_sources(kw: dict[str, Any]) -> None:
    if kw["bundle_dir"] is not None and kw["decoder_ggufs"]:
        raise UserError("pass either --bundle BUNDLE_DIR or --decoder-gguf FILE, not both")


def _engine(kw: dict[str, Any]) -> Any:
    from medgemma_edge.datasets import EngineOptions

    return EngineOptions(kw["engine"], kw["ray_address"], kw["workers"], kw["cpus_per_worker"])


def _job_kw(kw: dict[str, Any]) -> dict[str, Any]:
    study = (("max_slices", kw["max_slices"]), ("slice_order", kw["slice_order"]), ("preset", kw["windowing"]))
    if kw["instruction"] is not None:
        study += (("instruction", kw["instruction"]),)
    return dict(sampling=sampling(kw), system=kw["system"], raw=kw["raw"], thinking=kw["thinking"],
                dicom_frame=kw["dicom_frame"], dicom_context=kw["dicom_context"], study=study)


def _study_ctx(kw: dict[str, Any], items: list[Any]) -> None:
    """Study folders need a long context: size it from --max-slices unless --ctx was given."""
    from click.core import ParameterSource

    if not any(i.study for i in items) or kw["bundle_dir"] is None:
        return
    if click.get_current_context().get_parameter_source("n_ctx") is not ParameterSource.DEFAULT:
        return
    from medgemma_edge.bundle import open_bundle

    tpi = int(open_bundle(kw["bundle_dir"]).config.get("tokens_per_image") or 0)
    # per slice: its span, two markers, "\n\n" twice and a label; then the instruction, question and answer
    need = kw["max_slices"] * (tpi + 16) + 1024 + kw["max_new_tokens"]
    kw["n_ctx"] = min(max(kw["n_ctx"], need), MAX_CTX)


@cli.command(epilog=EPILOG)
@click.option("--input", "source", required=True, type=click.Path(path_type=Path),
              help="A folder (each image, DICOM file or study sub-folder is one item) or a .jsonl/.csv manifest.")
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="Results, one JSON line per item; run again with the same file to resume.")
@click.option("--prompt", default=None, help="The question for items that have none (every item of a folder).")
@click.option("--summary-json", type=click.Path(path_type=Path), default=None, help="Also write the summary here.")
@model_options
@answer_options
@cache_options
@engine_options
@study_batch_options
def batch(source: Path, output: Path, prompt: str | None, summary_json: Path | None, **kw: Any) -> None:
    """Answer every item of a cohort into a JSONL file, resumably (a killed run picks up where it stopped).

    \b
    Examples:
      medgemma-edge batch --bundle B --input cxr_folder/ --prompt "Describe this X-ray" --output results.jsonl
      medgemma-edge batch --bundle B --input cohort.jsonl --output results.jsonl --cache-dir /var/cache/mg
      medgemma-edge batch --bundle B --input cohort.csv --output results.jsonl --engine ray --ray-address auto
    """
    from medgemma_edge.datasets import Job, read_items, run_job
    from medgemma_edge.datasets.batch import audit_entry

    _check_sources(kw)
    if len(kw["decoder_ggufs"]) > 1:
        raise UserError("batch runs one model: pass --decoder-gguf once (eval compares several)")
    items = read_items(source)
    if prompt is None and any(i.question is None for i in items):
        first = next(i for i in items if i.question is None)
        raise UserError(f"item {first.id} has no question: pass --prompt TEXT (the question for every such item)")
    _study_ctx(kw, items)
    engine = _engine(kw)
    needs_images = any(i.images or i.study for i in items)
    gguf = kw["decoder_ggufs"][0] if kw["decoder_ggufs"] else None
    job = Job.make("answer", _target(kw, needs_images, gguf), prompt=prompt, **_job_kw(kw))
    audit = audit_log(kw)
    on_record = (lambda record: audit.append(audit_entry(record, audit.include_text))) if audit else None
    summary = run_job(job, items, output, engine, retry_errors=kw["retry_errors"], progress=not kw["no_progress"],
                      on_record=on_record)
    if summary_json is not None:
        from medgemma_edge.fsutil import atomic_write

        atomic_write(summary_json, json.dumps(summary.to_json(), indent=2) + "\n")
    click.echo(summary.line(), err=True)


@cli.command("eval", epilog=EPILOG)
@click.option("--data", "source", required=True, type=click.Path(path_type=Path),
              help="Questions, one JSON object per line: id, question, options (object or list), answer, images.")
@click.option("--artifacts", default=None,
              help="Comma-separated decoders (gguf:q4_k_m) or ENCODER+DECODER pairs to compare (default: --decoder).")
@click.option("--reference", default=None, help="The artifact the others are compared with (default: the most faithful).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for items.jsonl, eval.json, eval.md, eval.png (default: eval-DATA beside the data file).")
@click.option("--prompt", default=None, help="The question for items that have none.")
@model_options
@answer_options
@cache_options
@engine_options
@study_batch_options
def eval_cmd(source: Path, artifacts: str | None, reference: str | None, out_dir: Path | None, prompt: str | None,
             **kw: Any) -> None:
    """Score a question set with one or more artifacts; accuracy with 95% intervals and paired McNemar tests.

    \b
    Multiple choice is scored twice: by each option's log-likelihood and by the letter the model writes (the
    extraction rule: `python -c "import medgemma_edge.datasets.scoring as s; help(s)"`); free-text items with
    an answer by exact and normalised match.
    Examples:
      medgemma-edge eval --bundle B --data medqa_style.jsonl --artifacts gguf:q8_0,gguf:q4_k_m,onnx:int4
      medgemma-edge eval --decoder-gguf a.gguf --decoder-gguf b.gguf --raw --data questions.jsonl
    """
    from medgemma_edge.datasets import read_items
    from medgemma_edge.datasets.eval import bundle_targets, run_eval

    _check_sources(kw)
    if source.suffix.lower() != ".jsonl" and not source.is_dir():
        raise UserError(f"{source}: eval reads a .jsonl question set (one JSON object per line)")
    items = read_items(source)
    needs_images = any(i.images for i in items)
    if artifacts is not None and (kw["decoder"] or kw["decoder_ggufs"]):
        raise UserError("--artifacts names every decoder to compare: drop --decoder/--decoder-gguf")
    if kw["decoder_ggufs"]:
        targets = [_target(kw, False, Path(p)) for p in kw["decoder_ggufs"]]
    elif artifacts is not None:
        names = [a.strip().lower() for a in artifacts.split(",") if a.strip()]
        if not names:
            raise UserError("--artifacts is empty; name decoders like gguf:q8_0,gguf:q4_k_m")
        targets = bundle_targets(str(kw["bundle_dir"]) if kw["bundle_dir"] else "", names,
                                 _target(kw, needs_images))
    else:
        targets = [_target(kw, needs_images)]
    out = out_dir if out_dir is not None else source.parent / f"eval-{source.stem}"
    report = run_eval(targets, items, out, reference=reference, options=_engine(kw), retry_errors=kw["retry_errors"],
                      progress=not kw["no_progress"], prompt=prompt, **_job_kw(kw))
    from medgemma_edge.datasets.eval_report import markdown

    click.echo(markdown(report))
    click.echo(f"written: {out / 'eval.json'}, {out / 'eval.md'}, {out / 'items.jsonl'}", err=True)

