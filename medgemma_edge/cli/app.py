"""The `medgemma-edge` click group; each command module adds itself to it."""

from __future__ import annotations

import logging

import click

from medgemma_edge.runtime.generate import NOTICE

EPILOG = f"{NOTICE} Nothing is downloaded: every command works offline."


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medgemma-edge")
@click.option("-v", "--verbose", is_flag=True, help="Show progress logs and llama.cpp's own messages.")
def cli(verbose: bool) -> None:
    """Convert, run and inspect MedGemma on local hardware (llama.cpp, offline)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
