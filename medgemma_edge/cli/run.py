"""`run` and `chat`: answer questions about images, one shot or as a conversation."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from medgemma_edge.cli.app import EPILOG, cli
from medgemma_edge.cli.options import (answer_options, audit_log, cache_options, load_bundle, model_options, question,
                                       sampling, show_reasoning, thinking_system)
from medgemma_edge.cli.study import CHAT_ROOM, plan_turn, size_context, study_options
from medgemma_edge.errors import UserError


@cli.command(epilog=EPILOG)
@click.argument("prompt")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image file (repeatable); shown after the prompt.")
@click.option("--decoder-gguf", type=click.Path(path_type=Path), help="Text-only: any Gemma 3 decoder GGUF instead of a bundle.")
@click.option("--raw", is_flag=True, help="No chat template: continue PROMPT as plain text (for base, non-instruction models).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token counts, timings) instead of streaming.")
@model_options
@answer_options
@cache_options
@study_options
def run(prompt: str, images: tuple[Path, ...], decoder_gguf: Path | None, raw: bool, as_json: bool, **kw: Any) -> None:
    """Answer PROMPT about zero or more images, streaming tokens to stdout.

    \b
    Examples:
      medgemma-edge run --bundle B --image cxr.png "Describe this X-ray"
      medgemma-edge run --decoder-gguf gemma-3-270m.gguf --raw "The capital of France is"
      medgemma-edge run --bundle B --study ct_series/ "Is there a hypodense liver lesion?"
      medgemma-edge run --bundle B --image today.dcm --prior last_year.dcm "Compare with the prior"
    """
    from medgemma_edge.inputs.files import prepare_images
    from medgemma_edge.runtime.generate import stream_generate
    from medgemma_edge.runtime.loader import load_decoder_gguf

    if kw["bundle_dir"] is not None and decoder_gguf is not None:
        raise UserError("pass either --bundle BUNDLE_DIR or --decoder-gguf FILE, not both")
    params = sampling(kw)
    turn = plan_turn(kw, prompt, images)  # a study, priors or pan-and-scan; None for a plain question
    if turn is not None and (raw or decoder_gguf is not None):
        raise UserError("--study, --prior and --pan-and-scan need a multimodal --bundle; drop --raw/--decoder-gguf")
    inputs = prepare_images(images, kw["dicom_frame"]) if turn is None else []
    prompt = question(kw)(prompt, images) if turn is None else turn.question
    audit = audit_log(kw)
    if decoder_gguf is not None:
        pipe = load_decoder_gguf(decoder_gguf, n_ctx=kw["n_ctx"], n_threads=kw["threads"])
    elif turn is not None:
        pipe = load_bundle(kw, with_images=True, images_given=True, **size_context(kw, turn))
        pipe.progress = not as_json and sys.stderr.isatty()
    else:
        pipe = load_bundle(kw, with_images=bool(images), images_given=bool(images))
    if turn is not None:
        from medgemma_edge.runtime.studies import stream_turn

        chunks = stream_turn(pipe, turn, thinking_system(kw, pipe), params, thinking=kw["thinking"])
    else:
        chunks = stream_generate(pipe, prompt, inputs, system=kw["system"], sampling=params, raw=raw,
                                 thinking=kw["thinking"])
    result, think, thought = None, show_reasoning(kw), False
    for chunk in chunks:
        if not as_json:
            click.echo(chunk.text, nl=False)
            if think and chunk.reasoning:
                think(chunk.reasoning)
                thought = True
        result = chunk.result or result
    if not as_json:
        click.echo()
        if thought:
            click.echo(err=True)
    assert result is not None
    if audit:
        audit.record("run", pipe.info, prompt, kw["system"], turn.sources if turn is not None else images, result)
    if as_json:
        click.echo(json.dumps(result.to_json({**pipe.info, "sampling": params.to_json(),
                                              **({"study": turn.info} if turn is not None else {})}), indent=2))


@cli.command(epilog=EPILOG)
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="Image(s) for the first question.")
@model_options
@answer_options
@cache_options
@study_options
def chat(images: tuple[Path, ...], **kw: Any) -> None:
    """Ask several questions about the same images or study (--study); follow-ups re-encode nothing.

    \b
    Type a question and press Enter. Commands:
      /image PATH   attach an image to the next question
      /reset        start a new conversation (encoded images stay cached)
      /quit or EOF  leave
    """
    from medgemma_edge.inputs.files import prepare_images
    from medgemma_edge.runtime.chat import ChatSession
    from medgemma_edge.runtime.pipeline import no_vision
    from medgemma_edge.runtime.repl import ChatRepl

    from medgemma_edge.runtime.studies import StudySession

    params = sampling(kw)
    turn = plan_turn(kw, "", images)  # a study, priors or pan-and-scan: its images go with the first question
    prepare = lambda paths: prepare_images(paths, kw["dicom_frame"])  # noqa: E731
    if turn is None:
        prepare(images)
    audit = audit_log(kw)
    if turn is None:
        pipe = load_bundle(kw, with_images=True, images_given=bool(images))
    else:  # room for the conversation after the study: CHAT_ROOM tokens unless --ctx says otherwise
        pipe = load_bundle(kw, with_images=True, images_given=True, **size_context(kw, turn, room=CHAT_ROOM))
        pipe.progress = sys.stderr.isatty()

    def attachable(paths: Sequence[Path]) -> list[Any]:  # a text-only bundle refuses /image when it is typed
        if paths and pipe.encoder is None:
            raise no_vision(str(kw["bundle_dir"]), "it takes no images; ask without /image")
        return prepare(paths)

    sources = list(turn.sources) if turn is not None else []  # every answer is about the study's files too
    answered = (lambda q, paths, result: audit.record("chat", pipe.info, q, kw["system"], [*sources, *paths],
                                                      result)) if audit else None
    session = (ChatSession(pipe, system=kw["system"], thinking=kw["thinking"]) if turn is None
               else StudySession(pipe, turn, kw["system"], thinking=kw["thinking"]))
    repl = ChatRepl(session, params, attachable, question(kw),
                    write=lambda text: click.echo(text, nl=False), note=lambda line: click.echo(line, err=True),
                    answered=answered, pending=list(images) if turn is None else [], think=show_reasoning(kw))
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("> ", nl=False)
        line = sys.stdin.buffer.readline()  # bytes: a line that is not UTF-8 is reported, not fatal
        if not line or not repl.feed(line):
            break
