"""`medgemma-edge`: thin click layers, one module per command group; each command parses its options
and calls the library."""

from __future__ import annotations

import logging
import sys

import click

from medgemma_edge.cli import bundle, datasets, demo, measure, render, run, serve, study  # noqa: F401  (each registers its commands)
from medgemma_edge.cli.app import cli
from medgemma_edge.errors import UserError

log = logging.getLogger("medgemma_edge")


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
        click.echo(f"error: {exc.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if log.isEnabledFor(logging.DEBUG):
            raise
        click.echo(f"error: internal error ({type(exc).__name__}: {exc}); re-run with --verbose for details", err=True)
        sys.exit(1)
