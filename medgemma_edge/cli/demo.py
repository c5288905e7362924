"""`medgemma-edge demo`: the whole path on a machine with no model at all.

Builds a tiny RANDOM-WEIGHT checkpoint in MedGemma's layout, converts it to a bundle, and answers a
question about a generated chest-film-like image. The answer is noise by construction; what the demo
shows is that synth -> convert -> verify -> encode -> decode works here, offline, and how fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from medgemma_edge.bundle import MANIFEST
from medgemma_edge.cli.app import EPILOG, cli
from medgemma_edge.runtime.generate import NOTICE

BANNER = "DEMO ON RANDOM WEIGHTS: a tiny synthetic model, so the answer below is meaningless by design."


def run_demo(workdir: Path) -> None:
    from medgemma_edge.extras import convert_checkpoint, synthesize
    from medgemma_edge.inputs.samples import PROMPT, SYSTEM, sample_image
    from medgemma_edge.runtime.generate import stream_generate
    from medgemma_edge.runtime.loader import load
    from medgemma_edge.runtime.sampling import SamplingParams

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt, bundle_dir = workdir / "tiny-checkpoint", workdir / "tiny-bundle"
    click.secho(BANNER, fg="yellow", bold=True, err=True)
    if not (ckpt / "config.json").is_file():
        click.echo(f"[1/3] synthesizing a tiny MedGemma-layout checkpoint in {ckpt}", err=True)
        synthesize(ckpt, size="tiny", seed=0)
    if not (bundle_dir / MANIFEST).is_file():
        click.echo(f"[2/3] converting it to a bundle in {bundle_dir} (decoder q4_k_m + f32, mmproj f16)", err=True)
        convert_checkpoint(ckpt, bundle_dir, ["q4_k_m", "f32"], ["f16"], overwrite=True)
    image = sample_image(workdir / "sample-cxr.png")
    click.echo(f"[3/3] medgemma-edge run --bundle {bundle_dir} --image {image} \"{PROMPT}\"", err=True)
    result = None
    with load(bundle_dir, encoder="gguf:f16", decoder="gguf:q4_k_m") as pipe:
        for chunk in stream_generate(pipe, PROMPT, [image], system=SYSTEM,
                                     sampling=SamplingParams(max_new_tokens=24)):
            click.echo(chunk.text, nl=False)
            result = chunk.result or result
    click.echo()
    assert result is not None
    t = result.timings
    click.echo(f"image encode {t['image_encode_ms']:.0f} ms, time to first token {t['time_to_first_token_ms']:.0f} ms, "
               f"decode {t['decode_tokens_per_s']:.1f} tok/s  ({NOTICE})", err=True)
    click.secho(BANNER, fg="yellow", bold=True, err=True)


@cli.command(epilog=EPILOG)
@click.option("--workdir", default=Path(".cache/demo"), show_default=True, type=click.Path(path_type=Path))
def demo(workdir: Path) -> None:
    """Build a tiny random-weight bundle on the fly and run it on a sample image, end to end."""
    run_demo(workdir)
