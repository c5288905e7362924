"""`medgemma-edge convert`: checkpoint -> bundle, atomically.

Everything is written into a hidden `.NAME.partial-PID` folder beside the target; the manifest is
written last and the folder renamed into place only when every artifact is hashed. A conversion
killed at any point therefore leaves no folder that `load` or `info` would accept, and the next
conversion cleans up what it left.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tqdm import tqdm

from convert.checkpoint import Checkpoint
from convert.gguf_decoder import DECODER_PRECISIONS, quantize_decoder, write_decoder_f32
from convert.gguf_mmproj import MMPROJ_PRECISIONS, write_mmproj
from convert.onnx_decoder import ONNX_DECODER_PRECISIONS, write_onnx_decoder
from convert.onnx_vision import ONNX_VISION_PRECISIONS, write_onnx_vision
from convert.spec import load_spec
from medgemma_edge import __version__
from medgemma_edge.bundle import (MANIFEST, FORMAT, FORMAT_VERSION, Artifact, Bundle, open_bundle, sha256_file,
                                  write_manifest)
from medgemma_edge.errors import UserError
from medgemma_edge.native import quiet_llama

log = logging.getLogger(__name__)


def _check_precisions(asked: list[str], known: dict[str, Any], flag: str) -> list[str]:
    bad = [p for p in asked if p not in known]
    if bad:
        raise UserError(f"{flag} {bad[0]!r} is not supported; choose from {', '.join(known)}")
    return list(dict.fromkeys(asked))  # de-duplicate, keep order


def _clean_leftovers(out_dir: Path) -> None:
    """Tidy up after conversions that were killed: drop their partial folders, and put back a bundle
    that was being replaced (`.NAME.old-PID`) if the new one never made it into place."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        kind, _, pid = stale.name[len(out_dir.name) + 2:].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out_dir.exists():
            log.warning("restoring %s, which an interrupted --overwrite had moved aside", out_dir)
            stale.rename(out_dir)
        else:
            log.info("removing leftovers of an interrupted conversion: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:  # e.g. onnxruntime-gpu installed instead of onnxruntime
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, gguf: list[str], mmproj: list[str],
                       overwrite: bool = False, progress: bool = True, onnx_vision: list[str] | None = None,
                       onnx_decoder: list[str] | None = None, calibration_images: Path | None = None) -> Bundle:
    src, out = Path(checkpoint_dir), Path(out_dir)
    plan = {
        "gguf": _check_precisions(gguf, DECODER_PRECISIONS, "--gguf"),
        "mmproj": _check_precisions(mmproj, MMPROJ_PRECISIONS, "--mmproj"),
        "onnx_vision": _check_precisions(onnx_vision or [], ONNX_VISION_PRECISIONS, "--onnx-vision"),
        "onnx_decoder": _check_precisions(onnx_decoder or [], ONNX_DECODER_PRECISIONS, "--onnx-decoder"),
    }
    if not any(plan.values()):
        raise UserError("nothing to convert: pass at least one --gguf, --mmproj, --onnx-vision or --onnx-decoder precision")
    if (plan["onnx_decoder"] or plan["mmproj"]) and not plan["gguf"]:
        # the GGUF decoder carries the vocabulary every backend tokenizes with (and mtmd needs)
        raise UserError("--onnx-decoder and --mmproj need at least one --gguf precision in the same bundle "
                        "(it holds the tokenizer); add e.g. --gguf q4_k_m")
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
    quiet_llama()

    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        artifacts = _write_artifacts(ckpt, spec, tmp, plan, calibration_images, progress)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "notice": "Research use only; not for clinical diagnosis (see the MedGemma model card).",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "converter": {
                "name": "medgemma-edge", "version": __version__, "python": platform.python_version(),
                **{pkg.replace("-", "_"): _version(pkg)
                   for pkg in ("llama-cpp-python", "gguf", "onnx", "onnxruntime", "onnxruntime-gpu", "torch")},
            },
            "source": {"path": str(src.resolve()), "files": ckpt.file_hashes()},
            "config": spec.summary(),
            "artifacts": [a.to_json() for a in artifacts],
        }
        write_manifest(tmp, manifest)
        if overwrite and out.exists():
            # two renames, not one: a kill in between leaves `.old-PID`, which the next run restores
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                old.rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(out)  # fails if someone else filled `out` meanwhile: never replace what we did not check
            except OSError as exc:
                raise UserError(f"{out}: appeared while converting; pass --overwrite or choose another -o") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle written to %s", out)
    return open_bundle(out)


Written = tuple[str, str, str, Path, dict[str, Any]]  # kind, format, precision, main file, recipe


def _write_artifacts(ckpt: Checkpoint, spec: Any, tmp: Path, plan: dict[str, list[str]],
                     calibration_images: Path | None, progress: bool) -> list[Artifact]:
    written: list[Written] = []
    gguf = plan["gguf"]
    if gguf:
        base = tmp / ("decoder-f32.gguf" if "f32" in gguf else ".decoder-f32.base.gguf")
        write_decoder_f32(ckpt, spec, base, progress)
        if "f32" in gguf:
            written.append(("decoder", "gguf", "f32", base, {"writer": "medgemma-edge gguf_decoder"}))
        for p in tqdm([p for p in gguf if p != "f32"], desc="llama.cpp quantize", unit="artifact", disable=not progress):
            path = tmp / f"decoder-{p}.gguf"
            quantize_decoder(base, path, p)
            written.append(("decoder", "gguf", p, path, {"writer": "llama_model_quantize", "from": "f32",
                                                         "llama_ftype": DECODER_PRECISIONS[p]}))
        if "f32" not in gguf:
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
    for p in tqdm(plan["onnx_decoder"], desc="onnx decoder", unit="artifact", disable=not progress or not plan["onnx_decoder"]):
        path = tmp / f"decoder-{p}.onnx"
        written.append(("decoder", "onnx", p, path, write_onnx_decoder(ckpt, spec, path, p)))
    return [_hashed(tmp, w) for w in tqdm(written, desc="sha256", unit="artifact", disable=not progress)]


def _hashed(tmp: Path, w: Written) -> Artifact:
    kind, fmt, precision, path, recipe = w
    # ONNX external weights live beside the graph as `<file>.data`; they belong to the same artifact
    extra = [p for p in sorted(tmp.glob(path.name + ".*")) if p.is_file()]
    return Artifact(kind=kind, format=fmt, precision=precision, file=path.name, size=path.stat().st_size,
                    sha256=sha256_file(path), recipe=recipe,
                    extra_files=tuple({"file": e.name, "size": e.stat().st_size, "sha256": sha256_file(e)} for e in extra))
