"""What `medgemma-edge validate` runs on and with: prompts, images, the reference's shape, the artifact
selection and each artifact's partner, and a memory check; all before any model loads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from convert.registry import load_spec
from medgemma_edge.bundle import Artifact, Bundle
from medgemma_edge.bundle.precisions import FAITHFUL_ORDER
from medgemma_edge.errors import UserError
from medgemma_edge.inputs.samples import SYSTEM

log = logging.getLogger(__name__)

PROMPTS = (
    "Describe this chest X-ray.",
    "What are the typical radiographic signs of pneumonia?",
    "List three common causes of a pleural effusion.",
)

@dataclass(frozen=True)
class Case:
    name: str  # "text-1", "image-1": how the report refers to it
    prompt: str
    image: Path | None  # an RGB PNG rendered once, so transformers and the runtime read identical pixels
    source: str | None  # the user's file (or "built-in") the image came from


# -- inputs: all checked before anything heavy runs -------------------------------------------------
def read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(PROMPTS)
    if not path.is_file():
        raise UserError(f"{path}: prompts file not found; pass a text file with one prompt per line (or a JSON list)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable prompts file ({exc}); save it as UTF-8 text, one prompt per line") from exc
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: malformed JSON list ({exc}); write a JSON list of strings or one prompt per line") from exc
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise UserError(f"{path}: expected a JSON list of strings; write one prompt per line instead")
        prompts = [p.strip() for p in prompts if p.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path}: no prompts in the file; write one prompt per line or drop --prompts")
    return prompts


def find_images(folder: Path | None) -> list[Path]:
    from medgemma_edge.inputs.files import image_files
    from medgemma_edge.inputs.images import check_image_path

    if folder is None:
        return []
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder not found; pass a folder of PNG/JPEG/DICOM files or drop --images")
    files = image_files(folder)
    if not files:
        raise UserError(f"{folder}: no PNG/JPEG/DICOM images in this folder; add some or drop --images")
    for f in files:
        check_image_path(f)
    return files


def check_reference(reference: Path, bundle: Bundle) -> None:
    """Refuse a reference of another shape before loading 17 GB of it."""
    if not reference.is_dir():
        raise UserError(f"{reference}: reference checkpoint folder not found; pass the Hugging Face checkpoint "
                        f"the bundle was converted from")
    # through JSON, as the manifest was: tuples become lists, so equal shapes compare equal
    ref = json.loads(json.dumps(load_spec(reference).summary()))
    if ("vision" in ref) != bundle.has_vision:
        kinds = {True: "multimodal", False: "text-only"}
        raise UserError(f"{reference}: a {kinds['vision' in ref]} checkpoint but {bundle.dir} is a "
                        f"{kinds[bundle.has_vision]} bundle; pass the checkpoint it was converted from")
    for section in ("text", "vision"):
        for key, value in (ref.get(section) or {}).items():
            have = (bundle.config.get(section) or {}).get(key)
            if have != value and not (have is None and key in ("image_mean", "image_std")):  # older bundles lack these
                raise UserError(f"{reference}: {section}.{key} is {value} but the bundle's is {have}; this checkpoint "
                                f"is another model, pass the one {bundle.dir} was converted from")
    if bundle.has_vision and ref["tokens_per_image"] != bundle.config["tokens_per_image"]:
        raise UserError(f"{reference}: {ref['tokens_per_image']} tokens per image but the bundle has "
                        f"{bundle.config['tokens_per_image']}; pass the checkpoint {bundle.dir} was converted from")
    from convert.checkpoint import Checkpoint

    Checkpoint(reference)  # reads every safetensors header: a truncated shard fails here in one line, not later


def select(bundle: Bundle, asked: list[str]) -> list[Artifact]:
    """`gguf:f32` names both kinds where both exist; `decoder:gguf:f32` / `encoder:...` names one."""
    if not asked:
        return list(bundle.artifacts)
    chosen: list[Artifact] = []
    for name in asked:
        kind, _, ident = name.partition(":") if name.startswith(("decoder:", "encoder:")) else ("", "", name)
        hits = [a for a in bundle.artifacts if a.id == ident and (not kind or a.kind == kind)]
        if not hits:
            have = ", ".join(f"{a.kind}:{a.id}" for a in bundle.artifacts)
            raise UserError(f"--artifacts {name!r}: not in {bundle.dir} (it has {have}); pick from those")
        chosen += [a for a in hits if a not in chosen]
    return chosen


def partner(bundle: Bundle, kind: str) -> Artifact | None:
    have = {a.id: a for a in bundle.artifacts if a.kind == kind}
    order = [i for i in FAITHFUL_ORDER[kind] if i in have] + sorted(i for i in have if i not in FAITHFUL_ORDER[kind])
    return have[order[0]] if order else None


def make_cases(prompts: list[str], images: list[Path], workdir: Path, with_images: bool = True) -> list[Case]:
    """Every prompt text-only; every image once, asked the prompts in turn (the built-in film if none).
    `with_images` False (a text-only bundle): the prompts alone."""
    from medgemma_edge.inputs.images import load_image, to_rgb
    from medgemma_edge.inputs.samples import sample_image

    if not with_images:
        return [Case(f"text-{i + 1}", p, None, None) for i, p in enumerate(prompts)]
    sources: list[tuple[str, Path]] = [(str(p), p) for p in images]
    if not images:  # a non-square film: the resize must stretch, as for real radiographs
        sources = [("built-in", sample_image(workdir / "builtin.png"))]
    cases = [Case(f"text-{i + 1}", p, None, None) for i, p in enumerate(prompts)]
    for i, (label, path) in enumerate(sources):
        rendered = workdir / f"image-{i + 1}.png"  # DICOM windowing, EXIF, alpha: done once, our way
        to_rgb(load_image(path)).save(rendered, format="PNG")
        cases.append(Case(f"image-{i + 1}", prompts[i % len(prompts)], rendered, label))
    return cases


def preflight(bundle: Bundle, reference: Path, pairs: list[tuple[Artifact, Artifact | None]], n_ctx: int,
              force: bool) -> None:
    """Refuse, before an hour of reference work, a pairing that cannot load here (as `load` would)."""
    from medgemma_edge.runtime import memory

    cfg = bundle.config
    # transformers holds fp32: twice the bf16 safetensors, plus Python, torch and the activations (at 4B the
    # peak was 1.35 GiB over the weights' 16.0 GiB; benchmarks/README.md, "On the AMX Xeon")
    ref_need = 2 * sum(p.stat().st_size for p in reference.glob("*.safetensors")) + (3 << 29)
    have = memory.available_bytes()
    if have is not None and ref_need > have:
        log.warning("the fp32 reference needs about %.1f GiB and %.1f GiB is available: it may swap or be killed",
                    ref_need / memory.GiB, have / memory.GiB)
    for dec, enc in pairs:
        kv_bytes = 4 if dec.precision == "f32" or dec.format == "onnx" else 2  # as loader.load estimates
        weights = sum(a.total_size for a in (dec, enc) if a)
        need = memory.estimate(cfg, weights, n_ctx, max(512, int(cfg.get("tokens_per_image", 0))), kv_bytes,
                               enc is not None)
        memory.preflight(need, None, force, f"{bundle.dir} ({dec.id} with {enc.id if enc else 'no encoder'})")
