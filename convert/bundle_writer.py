"""`medgemma-edge convert`: checkpoint -> bundle, atomically.

Everything is written into a hidden `.NAME.partial-PID` folder beside the target (fsutil.publishing_dir);
the manifest is written last and the folder renamed into place only when every artifact is hashed. A
conversion killed at any point therefore leaves no folder that `load` or `info` would accept, and the
next conversion cleans up what it left.
"""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import platform
from pathlib import Path
from typing import Any

from tqdm import tqdm

from convert.checkpoint import Checkpoint
from convert.generation_config import read_generation_config
from convert.plan import describe, estimate, preflight
from convert.registry import load_spec
from convert.writers.gguf_decoder import DECODER_PRECISIONS, base_type, quantize_decoder, write_decoder_base
from convert.writers.gguf_mmproj import write_mmproj
from convert.writers import onnx_decoder as onnx_decoder_writer
from convert.writers.onnx_decoder import write_onnx_decoder
from convert.writers.onnx_decoder_graph import ATTENTION
from convert.writers.onnx_vision import check_request, write_onnx_vision
from convert.writers.ov_vision import OvVisionExporter
from convert.writers.ov_vision import check_request as check_ov_request
from medgemma_edge import __version__
from medgemma_edge.backends.llama_cpp.lib import quiet_llama
from medgemma_edge.bundle import FORMAT, FORMAT_VERSION, MANIFEST, Artifact, Bundle, open_bundle, write_manifest
from medgemma_edge.bundle.precisions import check_names
from medgemma_edge.errors import UserError
from medgemma_edge.fsutil import publishing_dir, sha256_file
from medgemma_edge.runtime import memory, sizing
from medgemma_edge.versions import package_version

log = logging.getLogger(__name__)


def convert_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, gguf: list[str], mmproj: list[str] | None,
                       overwrite: bool = False, progress: bool = True, onnx_vision: list[str] | None = None,
                       onnx_decoder: list[str] | None = None, calibration_images: Path | None = None,
                       force: bool = False, ov_vision: list[str] | None = None,
                       onnx_attention: str = "fused") -> Bundle:
    """Write a bundle of the planned artifacts; refused up front when disk or (unless `force`) memory is short.

    `mmproj` None: the default (f16) where the checkpoint has a vision part, none for a text-only one."""
    src, out = Path(checkpoint_dir), Path(out_dir)
    mmproj, onnx_vision = _encoder_request(src, mmproj, onnx_vision)
    plan = {
        "gguf": check_names(gguf, "decoder", "gguf"),
        "mmproj": check_names(mmproj, "encoder", "gguf"),
        "onnx_vision": check_names(onnx_vision or [], "encoder", "onnx"),
        "onnx_decoder": check_names(onnx_decoder or [], "decoder", "onnx"),
        "ov_vision": check_names(ov_vision or [], "encoder", "ov"),
    }
    if not any(plan.values()):
        raise UserError("nothing to convert: pass at least one --gguf, --mmproj, --onnx-vision, --ov-vision or --onnx-decoder "
                        "precision")
    if (plan["onnx_decoder"] or plan["mmproj"]) and not plan["gguf"]:
        # the GGUF decoder carries the vocabulary every backend tokenizes with (and mtmd needs)
        raise UserError("--onnx-decoder and --mmproj need at least one --gguf precision in the same bundle "
                        "(it holds the tokenizer); add e.g. --gguf q4_k_m")
    for p in plan["onnx_vision"]:
        check_request(p, calibration_images)  # now, not after minutes of export
    if plan["ov_vision"] and (src / "config.json").is_file() and load_spec(src).vision is None:
        raise UserError(f"{src}: a text-only checkpoint has no vision tower, so --ov-vision cannot be written; "
                        f"drop --ov-vision")
    for p in plan["ov_vision"]:
        check_ov_request(p)
    if onnx_attention not in ATTENTION:
        raise UserError(f"--onnx-attention {onnx_attention!r} is not supported; choose from {', '.join(ATTENTION)}")
    if calibration_images is not None and not Path(calibration_images).is_dir():
        raise UserError(f"{calibration_images}: calibration image folder not found; pass a folder of PNG/JPEG/DICOM files")
    if not src.is_dir():
        raise UserError(f"{src}: checkpoint folder not found; pass a local Hugging Face checkpoint folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another -o")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: already exists and is not empty; pass --overwrite to replace it or choose another -o")
        if not (out / MANIFEST).is_file():  # --overwrite replaces bundles, never an arbitrary folder
            raise UserError(f"{out}: is not a bundle (no {MANIFEST}); --overwrite only replaces bundles, choose another -o")
    spec = load_spec(src)
    ckpt = Checkpoint(src)
    needs = estimate(spec, plan, onnx_decoder_writer)
    log.info("conversion needs: %s", describe(needs))
    if plan["gguf"]:  # what the result will need to run, from the shapes (llama.cpp's own type mix)
        log.info("to run: %s", sizing.describe(spec.summary(), plan["gguf"]))
    preflight(needs, out, memory.available_bytes(), force)
    quiet_llama()

    try:
        with publishing_dir(out, replace=overwrite) as tmp:
            artifacts = _write_artifacts(ckpt, spec, tmp, plan, calibration_images, progress, onnx_attention)
            write_manifest(tmp, {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "notice": "Research use only; not for clinical diagnosis (see the MedGemma model card).",
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "converter": {
                    "name": "medgemma-edge", "version": __version__, "python": platform.python_version(),
                    **{pkg.replace("-", "_"): package_version(pkg)
                       for pkg in ("llama-cpp-python", "gguf", "onnx", "onnxruntime", "onnxruntime-gpu", "torch")},
                },
                "source": {"path": str(src.resolve()), "files": ckpt.file_hashes()},
                "config": spec.summary(),
                "generation": read_generation_config(src),  # recommended sampling: `run --sampling model`
                "artifacts": [a.to_json() for a in artifacts],
            })
    except FileExistsError as exc:  # someone else filled `out` meanwhile: never replace what we did not check
        raise UserError(f"{out}: appeared while converting; pass --overwrite or choose another -o") from exc
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise UserError(f"{out}: the disk filled up while converting ({exc.strerror}; nothing was left behind); "
                        f"free space (the estimate was {needs.peak_disk / 2**30:.1f} GiB) or choose another -o") from exc
    log.info("bundle written to %s", out)
    return open_bundle(out)


DEFAULT_MMPROJ = ["f16"]


def _encoder_request(src: Path, mmproj: list[str] | None, onnx_vision: list[str] | None) -> tuple[list[str], list[str]]:
    """The encoder precisions to write: none for a text-only checkpoint (asking for one is refused), else as asked."""
    if not (src / "config.json").is_file():  # reported below, after the flags are checked
        return (DEFAULT_MMPROJ if mmproj is None else mmproj), onnx_vision or []
    spec = load_spec(src)
    if spec.vision is not None:
        return (DEFAULT_MMPROJ if mmproj is None else mmproj), onnx_vision or []
    for flag, asked in (("--mmproj", mmproj), ("--onnx-vision", onnx_vision)):
        if asked:
            raise UserError(f"{src}: a text-only checkpoint ({spec.architecture}) has no vision tower, so "
                            f"{flag} {','.join(asked)} cannot be written; drop {flag}")
    if mmproj is None:
        log.warning("%s: a text-only checkpoint (%s): no image encoder to write, the default --mmproj %s is skipped",
                    src, spec.architecture, ",".join(DEFAULT_MMPROJ))
    return [], []


Written = tuple[str, str, str, Path, dict[str, Any]]  # kind, format, precision, main file, recipe


def _write_artifacts(ckpt: Checkpoint, spec: Any, tmp: Path, plan: dict[str, list[str]],
                     calibration_images: Path | None, progress: bool, onnx_attention: str) -> list[Artifact]:
    written: list[Written] = []
    gguf = plan["gguf"]
    if gguf:
        # the base llama.cpp quantizes from: f32 when f32 is asked for, else the checkpoint's own type
        base_name, _ = base_type(ckpt, "f32" in gguf)
        keep = base_name in gguf
        base = tmp / (f"decoder-{base_name}.gguf" if keep else f".decoder-{base_name}.base.gguf")
        write_decoder_base(ckpt, spec, base, base_name, progress)
        if keep:
            written.append(("decoder", "gguf", base_name, base, {"writer": "medgemma-edge gguf_decoder"}))
        for p in tqdm([p for p in gguf if p != base_name], desc="llama.cpp quantize", unit="artifact",
                      disable=not progress):
            path = tmp / f"decoder-{p}.gguf"
            quantize_decoder(base, path, p)
            written.append(("decoder", "gguf", p, path, {"writer": "llama_model_quantize", "from": base_name,
                                                         "llama_ftype": DECODER_PRECISIONS[p]}))
        if not keep:
            base.unlink()
    for p in plan["mmproj"]:
        path = tmp / f"mmproj-{p}.gguf"
        write_mmproj(ckpt, spec, path, p, progress)
        written.append(("encoder", "gguf", p, path, {
            "writer": "medgemma-edge gguf_mmproj",
            "policy": "embeddings and 1-D tensors F32; input projection F16 unless f32; rows not divisible by 32 F16",
        }))
    for p in tqdm(plan["onnx_vision"], desc="onnx vision", unit="artifact", disable=not progress or not plan["onnx_vision"]):
        path = tmp / f"vision-{p}.onnx"
        written.append(("encoder", "onnx", p, path, write_onnx_vision(ckpt, spec, path, p, calibration_images, progress)))
    if plan["ov_vision"]:  # one torch module and OpenVINO conversion for every precision
        exporter = OvVisionExporter(ckpt, spec, progress)
        for p in tqdm(plan["ov_vision"], desc="openvino vision", unit="artifact", disable=not progress):
            path = tmp / f"vision-ov-{p}.xml"
            written.append(("encoder", "ov", p, path, exporter.write(path, p)))
        del exporter
    for p in tqdm(plan["onnx_decoder"], desc="onnx decoder", unit="artifact", disable=not progress or not plan["onnx_decoder"]):
        path = tmp / f"decoder-{p}.onnx"
        written.append(("decoder", "onnx", p, path, write_onnx_decoder(ckpt, spec, path, p, attention=onnx_attention)))
    return [_hashed(tmp, w) for w in tqdm(written, desc="sha256", unit="artifact", disable=not progress)]


def _hashed(tmp: Path, w: Written) -> Artifact:
    kind, fmt, precision, path, recipe = w
    # ONNX external weights live beside the graph as `<file>.data`; they belong to the same artifact
    extra = [p for p in sorted(tmp.glob(path.name + ".*")) if p.is_file()]
    return Artifact(kind=kind, format=fmt, precision=precision, file=path.name, size=path.stat().st_size,
                    sha256=sha256_file(path), recipe=recipe,
                    extra_files=tuple({"file": e.name, "size": e.stat().st_size, "sha256": sha256_file(e)} for e in extra))
