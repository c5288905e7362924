"""Options shared by several commands, declared once, and the small parsers behind them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from medgemma_edge.errors import UserError
from medgemma_edge.runtime.sampling import SamplingParams

log = logging.getLogger("medgemma_edge")

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


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


def sampling(kw: dict[str, Any]) -> SamplingParams:
    return SamplingParams(max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"], top_p=kw["top_p"],
                          top_k=kw["top_k"], seed=kw["seed"])


def load_bundle(kw: dict[str, Any], with_images: bool) -> Any:
    from medgemma_edge.backends.onnx.session import provider_names
    from medgemma_edge.runtime.loader import load

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


def audit_log(kw: dict[str, Any]) -> Any:
    from medgemma_edge.runtime.audit import AuditLog

    return AuditLog(kw["audit_log"], kw["audit_include_text"]) if kw["audit_log"] else None


def question(kw: dict[str, Any]) -> Callable[[str, Any], str]:
    """The text sent for a question: with --dicom-context, the DICOM images' context lines first."""
    from medgemma_edge.inputs.files import with_dicom_context

    return (lambda text, paths: with_dicom_context(text, paths)) if kw["dicom_context"] else (lambda text, paths: text)
