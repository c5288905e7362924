"""`medgemma-edge`: a thin click layer; every command parses options and calls one library function."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
import click
import numpy as np

from medgemma_edge.errors import UserError
from medgemma_edge.onnx_session import provider_names
from medgemma_edge.pipeline import NOTICE
from medgemma_edge.preprocess import check_image_path

log = logging.getLogger("medgemma_edge")

EPILOG = f"{NOTICE} Nothing is downloaded: every command works offline."


def _csv(value: str) -> list[str]:
    return [v.strip().lower() for v in value.split(",") if v.strip()]


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medgemma-edge")
@click.option("-v", "--verbose", is_flag=True, help="Show progress logs and llama.cpp's own messages.")
def cli(verbose: bool) -> None:
    """Convert, run and inspect MedGemma on local hardware (llama.cpp, offline)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _options(*decorators: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Apply a group of click options in the order they are listed (shared by `run` and `chat`)."""
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


model_options = _options(
    click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), help="Bundle folder from `convert`."),
    click.option("--encoder", default=None, help="Encoder artifact, e.g. gguf:f16 (default: best in bundle)."),
    click.option("--decoder", default=None, help="Decoder artifact, e.g. gguf:q4_k_m (default: best in bundle)."),
    click.option("--system", default=None, help="System instruction, e.g. 'You are an expert radiologist.'"),
    click.option("--ctx", "n_ctx", default=4096, show_default=True, type=click.IntRange(64), help="Context length in tokens."),
    click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads (default: the backend's choice)."),
    click.option("--providers", default=None, help="ONNX Runtime providers, e.g. cuda,cpu (default: CUDA if usable, else CPU)."),
    click.option("--no-verify", is_flag=True, help="Skip re-hashing the artifacts against the manifest (logged)."),
    click.option("--memory-limit", type=click.FloatRange(0.0), default=None, help="GiB this may use (default: what is available)."),
    click.option("--force", is_flag=True, help="Load even if the memory estimate exceeds the limit."),
    click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(1, 8192)),
    click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0), help="0 = greedy."),
    click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0)),
    click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="0 = off."),
    click.option("--seed", default=None, type=int, help="Sampling seed (reproducible answers)."),
    click.option("--audit-log", type=click.Path(path_type=Path), default=None,
                 help="Append one JSON line per answer: hashes, artifact ids, token counts, timings; no text, no pixels."),
    click.option("--audit-include-text", is_flag=True, help="Also write prompt and answer text to the audit log."),
    click.option("--dicom-frame", type=click.IntRange(0), default=None, help="Frame of multi-frame DICOM images (default: the middle one)."),
    click.option("--dicom-context", is_flag=True,
                 help="Add modality, body part and view position of DICOM images to the question (no other tag is ever used)."),
)


def _images(paths: Sequence[Path], kw: dict[str, Any]) -> list[Any]:
    """Check every image now (milliseconds, before any model loads); render DICOM at the asked frame."""
    from medgemma_edge.dicom import is_dicom, render

    for path in paths:
        check_image_path(path)
    return [render(p, kw["dicom_frame"]) if kw["dicom_frame"] is not None and is_dicom(p) else p for p in paths]


def _with_context(prompt: str, paths: Sequence[Path], kw: dict[str, Any]) -> str:
    """--dicom-context: modality, body part and view of each DICOM image, and nothing else, before the question."""
    from medgemma_edge.dicom import dicom_context, is_dicom

    lines = [dicom_context(p) for p in paths if kw["dicom_context"] and is_dicom(p)]
    return "\n".join([line for line in lines if line] + [prompt])


def _sampling(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: kw[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}


def _load_bundle(kw: dict[str, Any], with_images: bool) -> Any:
    from medgemma_edge.loader import load

    if kw["bundle_dir"] is None:
        raise UserError("pass --bundle BUNDLE_DIR (a folder written by `medgemma-edge convert`)")
    limit = None if kw["memory_limit"] is None else int(kw["memory_limit"] * 2**30)
    providers = provider_names([p.strip() for p in kw["providers"].split(",") if p.strip()]) if kw["providers"] else None
    pipe = load(kw["bundle_dir"], encoder=kw["encoder"], decoder=kw["decoder"], n_ctx=kw["n_ctx"],
                n_threads=kw["threads"], verify=not kw["no_verify"], text_only=not with_images,
                force=kw["force"], memory_limit=limit, providers=providers)
    if kw["no_verify"]:  # after the load: a bad bundle still gets its one-line error alone
        log.warning("integrity check skipped (--no-verify): artifacts were used without re-hashing")
    return pipe


def _audit(kw: dict[str, Any]) -> Any:
    from medgemma_edge.audit import AuditLog

    return AuditLog(kw["audit_log"], kw["audit_include_text"]) if kw["audit_log"] else None


def _stream(gen: Any, echo: bool) -> Any:
    for piece in gen:
        if echo:
            click.echo(piece, nl=False)
    if echo:
        click.echo()
    return gen.result


@cli.command(epilog=EPILOG)
@click.argument("prompt")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image file (repeatable); shown after the prompt.")
@click.option("--decoder-gguf", type=click.Path(path_type=Path), help="Text-only: any Gemma 3 decoder GGUF instead of a bundle.")
@click.option("--raw", is_flag=True, help="No chat template: continue PROMPT as plain text (for base, non-instruction models).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token counts, timings) instead of streaming.")
@model_options
def run(prompt: str, images: tuple[Path, ...], decoder_gguf: Path | None, raw: bool, as_json: bool, **kw: Any) -> None:
    """Answer PROMPT about zero or more images, streaming tokens to stdout.

    \b
    Examples:
      medgemma-edge run --bundle B --image cxr.png "Describe this X-ray"
      medgemma-edge run --decoder-gguf gemma-3-270m.gguf --raw "The capital of France is"
    """
    from medgemma_edge.loader import load_decoder_gguf

    if kw["bundle_dir"] is not None and decoder_gguf is not None:
        raise UserError("pass either --bundle BUNDLE_DIR or --decoder-gguf FILE, not both")
    inputs = _images(images, kw)
    prompt = _with_context(prompt, images, kw)
    audit = _audit(kw)
    if decoder_gguf is not None:
        pipe = load_decoder_gguf(decoder_gguf, n_ctx=kw["n_ctx"], n_threads=kw["threads"])
    else:
        pipe = _load_bundle(kw, with_images=bool(images))
    gen = pipe.generate(prompt, images=inputs, system=kw["system"], stream=True, raw=raw, **_sampling(kw))
    result = _stream(gen, echo=not as_json)
    if audit:
        audit.record("run", pipe.info, prompt, kw["system"], images, result)
    if as_json:
        click.echo(json.dumps(result.to_json(pipe.info), indent=2))


@cli.command(epilog=EPILOG)
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image(s) for the first question.")
@model_options
def chat(images: tuple[Path, ...], **kw: Any) -> None:
    """Ask several questions about the same images; follow-ups re-encode nothing.

    \b
    Type a question and press Enter. Commands:
      /image PATH   attach an image to the next question
      /reset        start a new conversation (encoded images stay cached)
      /quit or EOF  leave
    """
    _images(images, kw)
    audit = _audit(kw)
    pipe = _load_bundle(kw, with_images=True)
    session = pipe.chat(system=kw["system"])
    pending: list[Path] = list(images)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("> ", nl=False)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/image"):
            path = Path(text[len("/image"):].strip())
            try:
                _images([path], kw)
            except UserError as exc:  # a typo must not end the consultation
                click.echo(f"error: {exc}", err=True)
                continue
            pending.append(path)
            click.echo(f"[image {path.name} attached to the next question]", err=True)
            continue
        if text == "/reset":
            session.reset()
            click.echo("[new conversation]", err=True)
            continue
        question = _with_context(text, pending, kw)
        try:
            result = _stream(session.ask(question, images=_images(pending, kw), stream=True, **_sampling(kw)), echo=True)
        except UserError as exc:  # e.g. context full or an unreadable image: report it, keep the session
            click.echo(f"error: {exc}", err=True)
            pending = []
            continue
        if audit:
            audit.record("chat", pipe.info, question, kw["system"], pending, result)
        pending = []
        t = result.timings
        log.info("ttft %.0f ms (%d tokens reused), decode %.1f tok/s", t["time_to_first_token_ms"],
                 result.reused_tokens, t["decode_tokens_per_s"])


@cli.command(epilog=EPILOG)
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Only print the manifest; do not re-hash artifacts.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(bundle_dir: Path, no_verify: bool, as_json: bool) -> None:
    """Print a bundle's manifest and verify every artifact's sha256."""
    from medgemma_edge.bundle import open_bundle

    bundle = open_bundle(bundle_dir)
    if not no_verify:
        bundle.verify()
    if as_json:
        click.echo(json.dumps({**bundle.manifest, "verified": not no_verify}, indent=2))
        return
    m, cfg = bundle.manifest, bundle.config
    t, v = cfg["text"], cfg["vision"]
    click.echo(f"bundle     {bundle.dir}  (id {bundle.manifest_sha256[:16]})")
    converter, source = m.get("converter") or {}, m.get("source") or {}
    click.echo(f"converter  medgemma-edge {converter.get('version', '?')}, {m.get('created', '?')}")
    click.echo(f"source     {source.get('path', '?')}  ({len(source.get('files') or {})} files hashed)")
    click.echo(f"decoder    gemma3: {t['num_layers']} layers, hidden {t['hidden_size']}, vocab {t['vocab_size']}")
    click.echo(f"vision     siglip: {v['num_layers']} layers, {v['image_size']}px, {cfg['tokens_per_image']} tokens/image")
    for a in bundle.artifacts:
        click.echo(f"  {a.kind:8s} {a.id:14s} {a.size / 2**20:9.1f} MiB  sha256 {a.sha256[:16]}  {a.file}")
    click.echo("integrity  all artifacts match the manifest" if not no_verify else "integrity  not checked (--no-verify)")


@cli.command(epilog=EPILOG)
@click.argument("checkpoint_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle folder to create.")
@click.option("--gguf", default="f16,q4_k_m", show_default=True, help="Decoder precisions: f32,f16,bf16,q8_0,q4_0,q4_k_m.")
@click.option("--mmproj", default="f16", show_default=True, help="llama.cpp vision encoder precisions: f32,f16,q8_0.")
@click.option("--onnx-vision", default="", help="ONNX Runtime vision encoder precisions: fp32,fp16,int8 (dynamic),int8_static.")
@click.option("--onnx-decoder", default="", help="ONNX Runtime decoder precisions: fp32,int8,int4 (weight-only).")
@click.option("--calibration-images", type=click.Path(path_type=Path), default=None,
              help="Folder of representative PNG/JPEG/DICOM images to calibrate --onnx-vision int8_static (QDQ).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle (atomically, only once the new one is complete).")
def convert(checkpoint_dir: Path, out_dir: Path, gguf: str, mmproj: str, onnx_vision: str, onnx_decoder: str,
            calibration_images: Path | None, overwrite: bool) -> None:
    """Convert a local MedGemma Hugging Face checkpoint into a bundle (GGUF and ONNX artifacts)."""
    from medgemma_edge.convert_entry import convert_checkpoint

    bundle = convert_checkpoint(checkpoint_dir, out_dir, _csv(gguf), _csv(mmproj), overwrite=overwrite,
                                onnx_vision=_csv(onnx_vision), onnx_decoder=_csv(onnx_decoder),
                                calibration_images=calibration_images)
    click.echo(f"wrote {bundle.dir}: " + ", ".join(f"{a.kind} {a.id}" for a in bundle.artifacts))


@cli.command(epilog=EPILOG)
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(["tiny", "4b"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
def synth(out_dir: Path, size: str, seed: int) -> None:
    """Write a RANDOM-WEIGHT checkpoint in MedGemma's published layout (for tests and benchmarks)."""
    from medgemma_edge.convert_entry import synthesize

    synthesize(out_dir, size=size, seed=seed)
    click.echo(f"wrote synthetic {size} checkpoint (random weights, not a medical model) to {out_dir}")


@cli.command(epilog=EPILOG)
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="PNG file to write.")
@click.option("--frame", type=click.IntRange(0), default=None, help="Frame of a multi-frame DICOM (default: the middle one).")
@click.option("--size", default=896, show_default=True, type=click.IntRange(0),
              help="Square side the encoder sees (MedGemma: 896); 0 keeps the rendered resolution.")
def render(image: Path, output: Path, frame: int | None, size: int) -> None:
    """Write exactly what the model will see for IMAGE (DICOM windowing, RGB, stretch to the square)."""
    from PIL import Image

    from medgemma_edge.preprocess import load_image, resize_square, to_rgb

    check_image_path(image)
    pixels = resize_square(image, size, frame) if size else to_rgb(load_image(image, frame))
    try:
        Image.fromarray(np.asarray(pixels)).save(output, format="PNG")
    except OSError as exc:
        raise UserError(f"{output}: cannot write the PNG ({exc.strerror or exc}); choose a writable -o") from exc
    click.echo(f"wrote {output}")


@cli.command(epilog=EPILOG)
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="Bundle folder from `convert`.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="Image (PNG/JPEG/DICOM, repeatable; default: synthetic chest-film-like images).")
@click.option("--combos", default=None,
              help="ENCODER+DECODER list, e.g. onnx:int8+gguf:q4_k_m,llama.cpp:f16+q4_k_m,transformers:fp32 "
                   "(default: every encoder with the default decoder, every decoder with the default encoder, "
                   "and the baselines).")
@click.option("--reps", default=3, show_default=True, type=click.IntRange(1), help="Measured rounds.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Discarded rounds first.")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads for every backend (default: theirs).")
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(2), help="Tokens decoded per answer (EOS ignored).")
@click.option("--scaling", default="1", show_default=True, help="Images per question to measure, e.g. 1,2,4.")
@click.option("--scaling-combos", default=None, help="Combinations measured with more than one image (default: all).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="The checkpoint the bundle came from: adds the transformers fp32 baseline (needs the convert extra).")
@click.option("--reference-tokens", default=8, show_default=True, type=click.IntRange(2), help="Tokens transformers decodes.")
@click.option("--ctx", "n_ctx", default=4096, show_default=True, type=click.IntRange(64), help="Context length in tokens.")
@click.option("--note", default=None, help="A line for the report (e.g. 'synthetic weights').")
@click.option("--out", "out_dir", default=Path("bench-results"), show_default=True, type=click.Path(path_type=Path),
              help="Folder for bench.json, bench.md and the PNG plots.")
def bench(bundle_dir: Path, images: tuple[Path, ...], scaling: str, out_dir: Path, **kw: Any) -> None:
    """Time every encoder/decoder combination on this machine, next to llama.cpp's own path (and transformers).

    \b
    Per combination: load time, image encode, prefill tokens/s (image and text apart), time to first
    token, decode tokens/s, follow-up-question TTFT (cached image) and peak RSS, as mean ± sd over
    --reps rounds after --warmup rounds. Each run is a fresh process; combinations alternate.
    Example:
      medgemma-edge bench --bundle B --combos onnx:int8+gguf:q4_k_m,llama.cpp:f16+q4_k_m --reps 5
    """
    from medgemma_edge.bench import run_bench

    try:
        counts = tuple(sorted({int(n) for n in scaling.split(",") if n.strip()}))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise UserError(f"--scaling {scaling!r}: give image counts such as 1,2,4")
    doc = run_bench(bundle_dir, out_dir, images=list(images), scaling=counts, **kw)
    click.echo((out_dir / "bench.md").read_text())
    click.echo(f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}" +
               "".join(f", {out_dir / p}" for p in doc.get("plots", [])), err=True)
    if doc["errors"]:
        raise UserError(f"{len(doc['errors'])} run(s) failed, first: {doc['errors'][0]}")


@cli.command(epilog=EPILOG)
@click.option("--workdir", default=Path(".cache/demo"), show_default=True, type=click.Path(path_type=Path))
def demo(workdir: Path) -> None:
    """Build a tiny random-weight bundle on the fly and run it on a sample image, end to end."""
    from medgemma_edge.demo import run_demo

    run_demo(workdir)


@cli.command("validate", epilog=EPILOG)
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="Bundle folder to validate.")
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="The Hugging Face checkpoint folder the bundle was converted from (run in transformers, fp32).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of PNG/JPEG/DICOM images (default: a built-in synthetic chest film).")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="Text file, one prompt per line, or a JSON list (default: 3 built-in prompts).")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(1, 1024),
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
    text-only and each image once. The reference needs ~4.2 GB per billion
    parameters of memory; it is freed before the artifacts load.
    Exit codes: 0 every threshold passed; 4 a threshold failed (report written,
    failures on stderr); 2 bad input; 3 an artifact's sha256 differs.
    """
    from medgemma_edge.validation_report import ThresholdFailed, validate_bundle

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
    from medgemma_edge.doctor import diagnose, render

    result = diagnose()
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(render(result)))


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    try:
        cli.main(args=argv, prog_name="medgemma-edge", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: one line too, not click's usage block
        hint = f"; see `{exc.ctx.command_path} --help`" if getattr(exc, "ctx", None) else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if log.isEnabledFor(logging.DEBUG):
            raise
        click.echo(f"error: internal error ({type(exc).__name__}: {exc}); re-run with --verbose for details", err=True)
        sys.exit(1)
