"""`medgemma-edge demo`: the whole path on a machine with no model at all.

Builds a tiny RANDOM-WEIGHT checkpoint in MedGemma's layout, converts it to a bundle, and answers a
question about a generated chest-film-like image. The answer is noise by construction; what the demo
shows is that synth -> convert -> verify -> encode -> decode works here, offline, and how fast.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from PIL import Image

from medgemma_edge.bundle import MANIFEST
from medgemma_edge.pipeline import NOTICE


BANNER = "DEMO ON RANDOM WEIGHTS: a tiny synthetic model, so the answer below is meaningless by design."


def sample_image(path: Path, size: tuple[int, int] = (480, 400), seed: int = 0) -> Path:
    """A grayscale PA-chest-like film: two dark lung fields, a bright mediastinum, film grain."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    lungs = sum(np.exp(-(((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2)) for cx in (0.3, 0.7))
    grain = np.random.default_rng(seed).normal(0, 6, (h, w))
    gray = np.clip(210 - 150 * lungs + grain, 0, 255).astype(np.uint8)
    Image.fromarray(gray, mode="L").save(path)
    return path


def run_demo(workdir: Path) -> None:
    from medgemma_edge.convert_entry import convert_checkpoint, synthesize
    from medgemma_edge.loader import load

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
    click.echo(f"[3/3] medgemma-edge run --bundle {bundle_dir} --image {image} \"Describe this X-ray\"", err=True)
    pipe = load(bundle_dir, encoder="gguf:f16", decoder="gguf:q4_k_m")
    gen = pipe.generate("Describe this X-ray", images=[image], system="You are an expert radiologist.",
                        max_new_tokens=24, stream=True)
    for piece in gen:  # type: ignore[union-attr]
        click.echo(piece, nl=False)
    click.echo()
    t = gen.result.timings  # type: ignore[union-attr]
    click.echo(f"image encode {t['image_encode_ms']:.0f} ms, time to first token {t['time_to_first_token_ms']:.0f} ms, "
               f"decode {t['decode_tokens_per_s']:.1f} tok/s  ({NOTICE})", err=True)
    click.secho(BANNER, fg="yellow", bold=True, err=True)
