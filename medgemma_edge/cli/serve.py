"""`serve`: the OpenAI-compatible server and the browser page (medgemma_edge.serve), as a click command."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import click

from medgemma_edge.cli.app import EPILOG, cli
from medgemma_edge.cli.options import MAX_CTX, MAX_THREADS, finite, load_bundle, whole
from medgemma_edge.errors import UserError


@cli.command(epilog=EPILOG)
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), help="Bundle folder from `convert`.")
@click.option("--encoder", default=None, help="Encoder artifact, e.g. gguf:f16 (default: best in bundle).")
@click.option("--decoder", default=None, help="Decoder artifact, e.g. gguf:q4_k_m (default: best in bundle).")
@click.option("--ctx", "n_ctx", default=4096, show_default=True, type=whole(64, MAX_CTX),
              help="Context length of each slot, in tokens.")
@click.option("--threads", default=None, type=whole(1, MAX_THREADS), help="CPU threads per slot (default: the backend's).")
@click.option("--providers", default=None, help="ONNX Runtime providers, e.g. cuda,cpu or openvino:gpu,cpu.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the artifacts against the manifest (logged).")
@click.option("--memory-limit", type=finite(0.0, 1e6), default=None, help="GiB this may use (default: what is available).")
@click.option("--force", is_flag=True, help="Load even if the memory estimate exceeds the limit.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --api-key-file.")
@click.option("--port", default=8080, show_default=True, type=whole(0, 65535), help="Port (0: any free one, announced).")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None,
              help="File with one API key per line; every endpoint but /health then needs `Authorization: Bearer KEY`.")
@click.option("--parallel", default=1, show_default=True, type=whole(1, 64),
              help="Slots: requests answered at once, each with its own KV cache (one copy of the weights).")
@click.option("--max-queue", default=8, show_default=True, type=whole(0, 4096),
              help="Requests that may wait for a slot; more get 429 with Retry-After.")
@click.option("--max-body-mb", default=64.0, show_default=True, type=finite(0.001, 4096.0), help="Largest request body.")
@click.option("--max-images", default=16, show_default=True, type=whole(1, 1024), help="Images per request.")
@click.option("--request-timeout", default=600.0, show_default=True, type=finite(1.0, 86400.0),
              help="Seconds from a request's arrival to its last token.")
@click.option("--allow-dir", "allow_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Folder whose files may be named by file:// image URLs (repeatable; default: none).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Origin allowed to call the API from a browser page elsewhere (repeatable; default: CORS off).")
@click.option("--audit-log", type=click.Path(path_type=Path), default=None,
              help="Append one JSON line per request: request id, hashes, artifact ids, token counts, timings; no text.")
@click.option("--audit-include-text", is_flag=True, help="Also write prompt and answer text to the audit log.")
@click.pass_context
def serve(ctx: click.Context, **kw: Any) -> None:
    """Serve the bundle over HTTP: OpenAI's /v1/chat/completions, a browser page at /, /health, /metrics.

    \b
    Examples:
      medgemma-edge serve --bundle B                         # http://127.0.0.1:8080, this machine only
      medgemma-edge serve --bundle B --host 0.0.0.0 --api-key-file keys.txt --parallel 2
    """
    missing = [m for m in ("fastapi", "uvicorn", "sse_starlette", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"serve needs the 'serve' extra ({missing[0]} is not installed): pip install 'medgemma-edge[serve]'")
    from medgemma_edge.serve import Limits, ServeConfig, serve as run_server
    from medgemma_edge.serve.auth import check_bind, read_keys

    if kw["bundle_dir"] is None:
        raise UserError("pass --bundle BUNDLE_DIR (a folder written by `medgemma-edge convert`)")
    from medgemma_edge.bundle import open_bundle

    open_bundle(kw["bundle_dir"])  # a wrong path is one line before anything listens (loading comes later)
    keys = read_keys(kw["api_key_file"]) if kw["api_key_file"] else []
    check_bind(kw["host"], keys)
    for folder in kw["allow_dirs"]:
        if not folder.is_dir():
            raise UserError(f"--allow-dir {folder}: not a folder; pass an existing folder")
    limits = Limits(parallel=kw["parallel"], max_queue=kw["max_queue"], max_body_bytes=int(kw["max_body_mb"] * 2**20),
                    max_images=kw["max_images"], request_timeout_s=kw["request_timeout"])
    config = ServeConfig(host=kw["host"], port=kw["port"], limits=limits, api_keys=tuple(keys),
                         allow_dirs=tuple(f.resolve() for f in kw["allow_dirs"]), cors_origins=tuple(kw["cors_origins"]),
                         audit_log=kw["audit_log"], audit_include_text=kw["audit_include_text"],
                         model_id=kw["bundle_dir"].resolve().name or "medgemma")
    verbose = bool(ctx.find_root().params.get("verbose"))
    run_server(config, lambda: load_bundle(kw, with_images=True, contexts=kw["parallel"]),
               announce=lambda line: click.echo(f"medgemma-edge serve: {line}", err=True), verbose=verbose)
