"""`run` and `chat`: answer questions about images, one shot or as a conversation."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from medgemma_edge.cli.app import EPILOG, cli
from medgemma_edge.cli.options import audit_log, load_bundle, model_options, question, sampling
from medgemma_edge.errors import UserError


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
    from medgemma_edge.inputs.files import prepare_images
    from medgemma_edge.runtime.generate import stream_generate
    from medgemma_edge.runtime.loader import load_decoder_gguf

    if kw["bundle_dir"] is not None and decoder_gguf is not None:
        raise UserError("pass either --bundle BUNDLE_DIR or --decoder-gguf FILE, not both")
    params = sampling(kw)
    inputs = prepare_images(images, kw["dicom_frame"])
    prompt = question(kw)(prompt, images)
    audit = audit_log(kw)
    if decoder_gguf is not None:
        pipe = load_decoder_gguf(decoder_gguf, n_ctx=kw["n_ctx"], n_threads=kw["threads"])
    else:
        pipe = load_bundle(kw, with_images=bool(images))
    result = None
    for chunk in stream_generate(pipe, prompt, inputs, system=kw["system"], sampling=params, raw=raw):
        if not as_json:
            click.echo(chunk.text, nl=False)
        result = chunk.result or result
    if not as_json:
        click.echo()
    assert result is not None
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
    from medgemma_edge.inputs.files import prepare_images
    from medgemma_edge.runtime.chat import ChatSession
    from medgemma_edge.runtime.repl import ChatRepl

    params = sampling(kw)
    prepare = lambda paths: prepare_images(paths, kw["dicom_frame"])  # noqa: E731
    prepare(images)
    audit = audit_log(kw)
    pipe = load_bundle(kw, with_images=True)
    answered = (lambda q, paths, result: audit.record("chat", pipe.info, q, kw["system"], paths, result)) if audit else None
    repl = ChatRepl(ChatSession(pipe, system=kw["system"]), params, prepare, question(kw),
                    write=lambda text: click.echo(text, nl=False), note=lambda line: click.echo(line, err=True),
                    answered=answered, pending=list(images))
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("> ", nl=False)
        line = sys.stdin.buffer.readline()  # bytes: a line that is not UTF-8 is reported, not fatal
        if not line or not repl.feed(line):
            break
