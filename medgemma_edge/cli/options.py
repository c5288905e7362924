"""Options shared by several commands, declared once, and the small parsers behind them."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.limits import MAX_FRAMES
from medgemma_edge.runtime.sampling import MAX_NEW_TOKENS, MAX_SEED, RECOMMENDED_KEYS, SamplingParams

log = logging.getLogger("medgemma_edge")

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

MAX_CTX = 131072  # MedGemma's max_position_embeddings; the memory preflight bounds what a machine can hold
MAX_THREADS = 1024


class Finite(click.FloatRange):
    """A float in [lo, hi] that is a number: click's FloatRange lets nan through (nan < lo is False)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def finite(lo: float, hi: float) -> Finite:
    return Finite(lo, hi)


def whole(lo: int, hi: int) -> click.IntRange:
    """Every integer option has both bounds: nothing unbounded reaches an allocation."""
    return click.IntRange(lo, hi)


def csv(value: str) -> list[str]:
    return [v.strip().lower() for v in value.split(",") if v.strip()]


def group(*decorators: Decorator) -> Decorator:
    """Apply a group of click options in the order they are listed."""
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


model_options = group(
    click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), help="Bundle folder from `convert`."),
    click.option("--encoder", default=None, help="Encoder artifact, e.g. gguf:f16 (default: best in bundle)."),
    click.option("--decoder", default=None, help="Decoder artifact, e.g. gguf:q4_k_m (default: best in bundle)."),
    click.option("--system", default=None, help="System instruction, e.g. 'You are an expert radiologist.'"),
    click.option("--ctx", "n_ctx", default=4096, show_default=True, type=whole(64, MAX_CTX), help="Context length in tokens."),
    click.option("--threads", default=None, type=whole(1, MAX_THREADS), help="CPU threads (default: the backend's choice)."),
    click.option("--providers", default=None,
                 help="ONNX Runtime providers, e.g. cuda,cpu or openvino:gpu,cpu (default: CUDA if usable, else CPU)."),
    click.option("--no-verify", is_flag=True, help="Skip re-hashing the artifacts against the manifest (logged)."),
    click.option("--memory-limit", type=finite(0.0, 1e6), default=None, help="GiB this may use (default: what is available)."),
    click.option("--force", is_flag=True, help="Load even if the memory estimate exceeds the limit."),
    click.option("--max-new-tokens", default=256, show_default=True, type=whole(1, MAX_NEW_TOKENS)),
    click.option("--temperature", default=0.0, show_default=True, type=finite(0.0, 100.0), help="0 = greedy."),
    click.option("--top-p", default=1.0, show_default=True, type=finite(0.0, 1.0)),
    click.option("--top-k", default=0, show_default=True, type=whole(0, 1 << 20), help="0 = off."),
    click.option("--seed", default=None, type=whole(0, MAX_SEED), help="Sampling seed (reproducible answers)."),
    click.option("--audit-log", type=click.Path(path_type=Path), default=None,
                 help="Append one JSON line per answer: hashes, artifact ids, token counts, timings; no text, no pixels."),
    click.option("--audit-include-text", is_flag=True, help="Also write prompt and answer text to the audit log."),
    click.option("--dicom-frame", type=whole(0, MAX_FRAMES - 1), default=None,
                 help="Frame of multi-frame DICOM images (default: the middle one)."),
    click.option("--dicom-context", is_flag=True,
                 help="Add modality, body part and view position of DICOM images to the question (no other tag is ever used)."),
)


cache_options = group(
    click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                 help="Keep image embeddings on disk here too (a local folder; shared by every run on this machine): "
                      "an image seen before, by the same encoder, is not encoded again."),
    click.option("--cache-size", "cache_size_gb", default=10.0, show_default=True, type=finite(0.001, 1e5),
                 help="GiB the --cache-dir may hold; least recently used embeddings go first."),
)


answer_options = group(
    click.option("--sampling", "sampling_preset", type=click.Choice(["greedy", "model"]), default="greedy",
                 show_default=True, help="model: the checkpoint's recommended temperature/top-k/top-p (its "
                 "generation_config.json, recorded in the manifest); options given here still win."),
    click.option("--stop", "stops", multiple=True, help="End the answer before this text (repeatable; not shown). "
                 "For a newline use the shell's quoting, e.g. $'\\n\\n'."),
    click.option("--repeat-penalty", default=1.0, show_default=True, type=finite(0.01, 10.0),
                 help="Divide the logits of tokens already in the prompt or answer (1 = off; 1.1-1.3 curbs loops)."),
    click.option("--presence-penalty", default=0.0, show_default=True, type=finite(-2.0, 2.0),
                 help="Subtract from tokens already in the answer (OpenAI's meaning; 0 = off)."),
    click.option("--frequency-penalty", default=0.0, show_default=True, type=finite(-2.0, 2.0),
                 help="Subtract per occurrence in the answer (OpenAI's meaning; 0 = off)."),
    click.option("--min-p", default=0.0, show_default=True, type=finite(0.0, 1.0),
                 help="When sampling, drop tokens less likely than MIN_P x the likeliest (0 = off)."),
    click.option("--logit-bias", "logit_biases", multiple=True, metavar="TOKEN=BIAS",
                 help="Add BIAS (-100..100; -100 bans) to token id TOKEN's logit (repeatable)."),
    click.option("--json-schema", type=click.Path(path_type=Path), default=None,
                 help="Constrain the answer to JSON that validates against this JSON schema file."),
    click.option("--thinking", is_flag=True,
                 help="Ask the model to think first (MedGemma 27B, 1.5); the reasoning is kept apart from the answer."),
    click.option("--show-thinking", is_flag=True, help="Stream the reasoning to stderr (with --json it is in the object)."),
)


def sampling(kw: dict[str, Any]) -> SamplingParams:
    """The SamplingParams the options ask for; with --sampling model, the manifest's recommended values
    under whatever was given on the command line."""
    from medgemma_edge.runtime.sampling import recommended

    given = {"max_new_tokens": kw["max_new_tokens"], "temperature": kw["temperature"], "top_p": kw["top_p"],
             "top_k": kw["top_k"], "seed": kw["seed"], "stop": kw["stops"], "repetition_penalty": kw["repeat_penalty"],
             "presence_penalty": kw["presence_penalty"], "frequency_penalty": kw["frequency_penalty"],
             "min_p": kw["min_p"], "logit_bias": [_bias(b) for b in kw["logit_biases"]],
             "json_schema": _schema_file(kw["json_schema"]) if kw["json_schema"] is not None else None}
    try:
        if kw["sampling_preset"] != "model":
            return SamplingParams(**given)
        if kw.get("bundle_dir") is None:
            raise UserError("--sampling model needs --bundle: the bundle's manifest records the checkpoint's "
                            "generation config")
        from medgemma_edge.bundle import open_bundle

        bundle = open_bundle(kw["bundle_dir"])
        ctx = click.get_current_context(silent=True)
        option = {"repetition_penalty": "repeat_penalty"}
        explicit = {k: v for k, v in given.items() if k not in RECOMMENDED_KEYS or (
            ctx is not None and ctx.get_parameter_source(option.get(k, k)) is not click.core.ParameterSource.DEFAULT)}
        return recommended(bundle.manifest.get("generation"), str(bundle.dir), **explicit)
    except UserError as exc:
        if kw["json_schema"] is not None and str(exc).startswith("json_schema:"):
            detail = str(exc).removeprefix("json_schema: ")
            raise UserError(f"{kw['json_schema']}: not a usable JSON schema: {detail}") from None
        raise


def _bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token.strip()), float(bias.strip())
    except ValueError:
        raise UserError(f"--logit-bias {text!r}: give TOKEN=BIAS, a token id and a number from -100 to 100 "
                        f"(e.g. 106=-100 bans <end_of_turn>)") from None


def _schema_file(path: Path) -> Any:
    """The schema file's JSON, refused in one line naming the file (unreadable, too large, not JSON)."""
    import json

    from medgemma_edge.runtime.sampling import MAX_SCHEMA_BYTES

    try:
        if not path.is_file():
            raise UserError(f"{path}: JSON schema file not found; pass a file holding a JSON schema")
        if path.stat().st_size > MAX_SCHEMA_BYTES:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes, more than a JSON schema may be "
                            f"({MAX_SCHEMA_BYTES:,}); pass a smaller schema")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the JSON schema ({exc}); check the file") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: not JSON ({exc}); a JSON schema is a JSON object") from None


def thinking_system(kw: dict[str, Any], pipe: Any) -> str | None:
    """The system text to send: with --thinking, Google's instruction first (refused for a model without
    thinking tokens)."""
    from medgemma_edge.runtime.thinking import thinking_system as with_instruction

    if not kw["thinking"]:
        return kw["system"]
    where = str(kw.get("bundle_dir") or pipe.info.get("decoder_gguf") or "this model")
    return with_instruction(pipe.tokenizer, kw["system"], where)


def show_reasoning(kw: dict[str, Any]) -> Callable[[str], None] | None:
    """Where streamed reasoning goes: stderr with --show-thinking, nowhere otherwise."""
    return (lambda text: click.echo(text, nl=False, err=True)) if kw["show_thinking"] else None


def load_bundle(kw: dict[str, Any], with_images: bool, images_given: bool = False, **load_kw: Any) -> Any:
    """`with_images`: load an encoder (where the bundle has one); `images_given`: --image was passed, which a
    text-only bundle refuses before any weights load."""
    from medgemma_edge.backends.onnx.session import provider_names
    from medgemma_edge.bundle import open_bundle
    from medgemma_edge.runtime.loader import load
    from medgemma_edge.runtime.pipeline import no_vision

    if kw["bundle_dir"] is None:
        raise UserError("pass --bundle BUNDLE_DIR (a folder written by `medgemma-edge convert`)")
    if images_given and not open_bundle(kw["bundle_dir"]).has_vision:
        raise no_vision(str(kw["bundle_dir"]), "it takes no --image; drop --image or pass a multimodal bundle")
    limit = None if kw["memory_limit"] is None else int(kw["memory_limit"] * 2**30)
    providers = provider_names([p.strip() for p in kw["providers"].split(",") if p.strip()]) if kw["providers"] else None
    if kw.get("cache_dir") is not None:  # cache_options: the persistent embedding cache
        load_kw = {"cache_dir": kw["cache_dir"], "cache_bytes": int(kw["cache_size_gb"] * 2**30), **load_kw}
    pipe = load(kw["bundle_dir"], encoder=kw["encoder"], decoder=kw["decoder"], n_ctx=kw["n_ctx"],
                n_threads=kw["threads"], verify=not kw["no_verify"], text_only=not with_images,
                force=kw["force"], memory_limit=limit, providers=providers, **load_kw)
    if kw["no_verify"]:  # after the load: a bad bundle still gets its one-line error alone
        log.warning("integrity check skipped (--no-verify): artifacts were used without re-hashing")
    return pipe


def audit_log(kw: dict[str, Any]) -> Any:
    from medgemma_edge.runtime.audit import AuditLog

    return AuditLog(kw["audit_log"], kw["audit_include_text"]) if kw["audit_log"] else None


def question(kw: dict[str, Any]) -> Callable[[str, Any], str]:
    """The text sent for a question: with --dicom-context, the DICOM images' context lines first."""
    from medgemma_edge.inputs.files import with_dicom_context

    return (lambda text, paths: with_dicom_context(text, paths)) if kw["dicom_context"] else (lambda text, paths: text)
