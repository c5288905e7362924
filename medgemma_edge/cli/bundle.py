"""`info`, `convert` and `synth`: bundles and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import click

from medgemma_edge.bundle.precisions import flag_help
from medgemma_edge.cli.app import EPILOG, cli
from medgemma_edge.cli.options import csv, whole


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
@click.option("--mmproj", default=None,
              help="llama.cpp vision encoder precisions (default: f16; none for a text-only checkpoint). "
                   + flag_help("encoder", "gguf") + ".")
@click.option("--onnx-vision", default="", help="ONNX Runtime vision encoder precisions. " + flag_help("encoder", "onnx") + ".")
@click.option("--onnx-decoder", default="", help="ONNX Runtime decoder precisions. " + flag_help("decoder", "onnx") + ".")
@click.option("--onnx-attention", type=click.Choice(["fused", "portable"]), default="fused", show_default=True,
              help="How the ONNX decoder attends. fused: ONNX Attention and TensorScatter (opset 24), ONNX Runtime's "
                   "CPU kernels. portable: MatMul, Softmax and ScatterElements (opset 17), which the OpenVINO, "
                   "DirectML and CUDA providers implement: pick it for a GPU or NPU provider.")
@click.option("--ov-vision", default="", help="OpenVINO vision encoder precisions (needs the `openvino` extra). "
              + flag_help("encoder", "ov") + ".")
@click.option("--calibration-images", type=click.Path(path_type=Path), default=None,
              help="Folder of representative PNG/JPEG/DICOM images to calibrate --onnx-vision int8_static (QDQ).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle (atomically, only once the new one is complete).")
@click.option("--force", is_flag=True, help="Convert even if the memory estimate exceeds what is available (never disk).")
def convert(checkpoint_dir: Path, out_dir: Path, gguf: str, mmproj: str | None, onnx_vision: str, onnx_decoder: str,
            calibration_images: Path | None, overwrite: bool, force: bool, ov_vision: str, onnx_attention: str) -> None:
    """Convert a local MedGemma Hugging Face checkpoint into a bundle (GGUF and ONNX artifacts).

    The disk and memory it needs are estimated from the checkpoint's shapes first; a conversion that
    would not fit is refused with both figures before anything is written."""
    from medgemma_edge.extras import convert_checkpoint

    # --mmproj not given (None) is the default, which a text-only checkpoint skips; given, it is a request
    bundle = convert_checkpoint(checkpoint_dir, out_dir, csv(gguf), None if mmproj is None else csv(mmproj),
                                overwrite=overwrite,
                                onnx_vision=csv(onnx_vision), onnx_decoder=csv(onnx_decoder),
                                calibration_images=calibration_images, force=force, ov_vision=csv(ov_vision),
                                onnx_attention=onnx_attention)
    click.echo(f"wrote {bundle.dir}: " + ", ".join(f"{a.kind} {a.id}" for a in bundle.artifacts))


@cli.command(epilog=EPILOG)
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(["tiny", "tiny-text", "tiny-27b", "tiny-27b-text", "4b"]), default="tiny",
              show_default=True, help="tiny-text: a text-only Gemma3ForCausalLM; tiny-27b*: MedGemma 27B's shape rules.")
@click.option("--seed", default=0, show_default=True, type=whole(0, 2**32 - 1), help="Random seed of the weights.")
def synth(out_dir: Path, size: str, seed: int) -> None:
    """Write a RANDOM-WEIGHT checkpoint in MedGemma's published layout (for tests and benchmarks)."""
    from medgemma_edge.extras import synthesize

    synthesize(out_dir, size=size, seed=seed)
    click.echo(f"wrote synthetic {size} checkpoint (random weights, not a medical model) to {out_dir}")
