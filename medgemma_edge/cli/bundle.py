"""`info`, `convert` and `synth`: bundles and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import click

from medgemma_edge.bundle.precisions import flag_help
from medgemma_edge.cli.app import EPILOG, cli
from medgemma_edge.cli.options import csv


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
    t = cfg["text"]
    click.echo(f"bundle     {bundle.dir}  (id {bundle.manifest_sha256[:16]})")
    converter, source = m.get("converter") or {}, m.get("source") or {}
    click.echo(f"converter  medgemma-edge {converter.get('version', '?')}, {m.get('created', '?')}")
    click.echo(f"source     {source.get('path', '?')}  ({len(source.get('files') or {})} files hashed)")
    click.echo(f"decoder    gemma3: {t['num_layers']} layers, hidden {t['hidden_size']}, vocab {t['vocab_size']}")
    if bundle.has_vision:
        v = cfg["vision"]
        click.echo(f"vision     siglip: {v['num_layers']} layers, {v['image_size']}px, {cfg['tokens_per_image']} tokens/image")
    else:
        click.echo("vision     none (a text-only model: no image input)")
    for a in bundle.artifacts:
        click.echo(f"  {a.kind:8s} {a.id:14s} {a.size / 2**20:9.1f} MiB  sha256 {a.sha256[:16]}  {a.file}")
    click.echo("integrity  all artifacts match the manifest" if not no_verify else "integrity  not checked (--no-verify)")


@cli.command(epilog=EPILOG)
@click.argument("checkpoint_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle folder to create.")
@click.option("--gguf", default="f16,q4_k_m", show_default=True,
              help="Decoder precisions, comma-separated. " + flag_help("decoder", "gguf") + ".")
@click.option("--mmproj", default="f16", show_default=True,
              help="llama.cpp vision encoder precisions. " + flag_help("encoder", "gguf") + ".")
@click.option("--onnx-vision", default="", help="ONNX Runtime vision encoder precisions. " + flag_help("encoder", "onnx") + ".")
@click.option("--onnx-decoder", default="", help="ONNX Runtime decoder precisions. " + flag_help("decoder", "onnx") + ".")
@click.option("--calibration-images", type=click.Path(path_type=Path), default=None,
              help="Folder of representative PNG/JPEG/DICOM images to calibrate --onnx-vision int8_static (QDQ).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle (atomically, only once the new one is complete).")
def convert(checkpoint_dir: Path, out_dir: Path, gguf: str, mmproj: str, onnx_vision: str, onnx_decoder: str,
            calibration_images: Path | None, overwrite: bool) -> None:
    """Convert a local MedGemma Hugging Face checkpoint into a bundle (GGUF and ONNX artifacts)."""
    from medgemma_edge.extras import convert_checkpoint

    bundle = convert_checkpoint(checkpoint_dir, out_dir, csv(gguf), csv(mmproj), overwrite=overwrite,
                                onnx_vision=csv(onnx_vision), onnx_decoder=csv(onnx_decoder),
                                calibration_images=calibration_images)
    click.echo(f"wrote {bundle.dir}: " + ", ".join(f"{a.kind} {a.id}" for a in bundle.artifacts))


@cli.command(epilog=EPILOG)
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(["tiny", "4b"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
def synth(out_dir: Path, size: str, seed: int) -> None:
    """Write a RANDOM-WEIGHT checkpoint in MedGemma's published layout (for tests and benchmarks)."""
    from medgemma_edge.extras import synthesize

    synthesize(out_dir, size=size, seed=seed)
    click.echo(f"wrote synthetic {size} checkpoint (random weights, not a medical model) to {out_dir}")
