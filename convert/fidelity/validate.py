"""Fidelity of every artifact of a bundle against the transformers fp32 reference, on the same inputs.

The reference runs first, on every input, and keeps only what the comparisons need (prompt logits,
greedy tokens, image features); it is freed before any artifact loads, so a 4B bundle validates in
the memory of one model at a time. Each artifact is then paired with the bundle's most faithful
partner (a decoder with the best encoder, an encoder with the best decoder) so its figures are its
own. Thresholds come from the one precision table (medgemma_edge/bundle/precisions.py).
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from convert.checkpoint import Checkpoint
from convert.fidelity.inputs import (SYSTEM, Case, check_reference, find_images, make_cases, partner, preflight,
                                     read_prompts, select)
from convert.fidelity.metrics import chunked_parity, compare, greedy_agreement, pool
from convert.fidelity.reference import reference_name
from medgemma_edge.bundle import Artifact, Bundle, open_bundle
from medgemma_edge.bundle.precisions import lookup
from medgemma_edge.errors import UserError

log = logging.getLogger(__name__)

@dataclass
class RefCase:
    ids: np.ndarray  # [n] int64
    logits: np.ndarray  # [n, vocab] float32: every prompt position
    greedy: list[int]  # greedy continuation, cut before the first end-of-turn/eos


# -- the reference ---------------------------------------------------------------------------------
def run_reference(reference: Path, cases: list[Case], max_new_tokens: int, eos: set[int],
                  progress: bool) -> tuple[list[RefCase], dict[str, np.ndarray]]:
    """Prompt logits and greedy tokens per case, image features per image; the model is gone on return."""
    from PIL import Image

    from convert.fidelity.reference import Reference

    log.info("loading the transformers fp32 reference from %s", reference)
    try:
        ref = Reference(reference)
    except (OSError, ValueError, RuntimeError, AssertionError) as exc:  # missing/corrupt weights, missing tensors
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{reference}: transformers cannot load this checkpoint ({detail}); pass a complete "
                        f"Hugging Face checkpoint folder") from exc
    out: list[RefCase] = []
    features: dict[str, np.ndarray] = {}
    for case in tqdm(cases, desc="reference (transformers fp32)", unit="prompt", disable=not progress):
        images = [case.image] if case.image else []
        ids, logits = ref.prompt_logits(case.prompt, images, SYSTEM)
        tokens, _ = ref.greedy(case.prompt, images, max_new_tokens, SYSTEM)
        out.append(RefCase(ids, logits.astype(np.float32, copy=False), _until_eos(tokens, eos)))
        if case.image is not None and case.name not in features:
            pixels = ref.processor.image_processor(images=[Image.open(case.image)], return_tensors="pt")["pixel_values"]
            with ref.torch.no_grad():
                feats = ref.model.get_image_features(pixel_values=pixels)
            feats = getattr(feats, "pooler_output", feats)  # transformers 5: an output object; 4.x: the tensor
            features[case.name] = feats[0].float().numpy()  # [tokens, hidden]
    del ref
    gc.collect()  # 17 GB at 4B: gone before the first artifact loads
    return out, features


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


# -- verdicts --------------------------------------------------------------------------------------
def check(figure: str, value: float | None, bound: float | None, op: str) -> dict[str, Any]:
    """One threshold verdict; `passed` is None where the precision has no bound (reported, never failed)."""
    if value is None:
        return {"figure": figure, "value": None, "bound": bound, "op": op, "passed": None}
    passed = None if bound is None else (value < bound if op == "<" else value >= bound)
    return {"figure": figure, "value": value, "bound": bound, "op": op, "passed": passed}


NEAR_TIE = ("a near-tie miss, a property of the weights: the KL bound holds, and every position whose reference "
            "top-2 margin exceeds twice our logit error there agrees, so the misses are positions the reference "
            "itself barely decides")


def near_tie(checks: list[dict[str, Any]], part: str, figures: dict[str, Any]) -> None:
    """Reclassify a missed top-1 floor as a near tie when the artifact's error is within its KL bound.

    Agreement at decisive positions (margin > 2 x our error there) follows from the error bound itself, so a
    top-1 miss with the KL bound met is a position where the reference's own margin is below our error: a
    property of the weights (random weights are full of near ties), not of the artifact. Reported, never hidden.
    """
    top1 = next((c for c in checks if c["figure"] == f"{part} top-1"), None)
    kl = next((c for c in checks if c["figure"] == f"{part} mean KL"), None)
    if top1 is None or kl is None or top1["passed"] is not False or kl["passed"] is not True:
        return
    if figures.get("decisive_top1") not in (None, 1.0):
        return
    top1.update(passed=None, near_tie=True, note=NEAR_TIE, decisive_share=figures.get("decisive_share"))


# -- the artifacts ---------------------------------------------------------------------------------
def _load(bundle: Bundle, decoder: Artifact, encoder: Artifact | None, n_ctx: int, force: bool) -> Any:
    from medgemma_edge.runtime.loader import load

    # verify=False: every artifact was hashed once up front
    return load(bundle.dir, encoder=encoder and encoder.id, decoder=decoder.id, text_only=encoder is None,
                n_ctx=n_ctx, verify=False, force=force)


def _logits(pipe: Any, case: Case, ref: RefCase) -> dict[str, float] | None:
    ids, logits = pipe.prompt_logits(case.prompt, [case.image] if case.image else [], SYSTEM)
    if ids.tolist() != ref.ids.tolist():
        return None  # misaligned positions: KL would compare different tokens
    return chunked_parity(ref.logits, logits)


def measure_decoder(bundle: Bundle, dec: Artifact, enc: Artifact | None, cases: list[Case], refs: list[RefCase],
                    max_new_tokens: int, n_ctx: int, force: bool = False) -> dict[str, Any]:
    from medgemma_edge.runtime.generate import generate
    from medgemma_edge.runtime.sampling import SamplingParams

    t0 = time.perf_counter()
    usable = [(c, r) for c, r in zip(cases, refs) if c.image is None or enc is not None]
    pipe = _load(bundle, dec, enc if any(c.image for c, _ in usable) else None, n_ctx, force)
    figures: dict[str, list[dict[str, float]]] = {"text": [], "image": []}
    mismatched, ours = [], []
    for case, ref in usable:
        m = _logits(pipe, case, ref)
        if m is None:
            mismatched.append(case.name)
        else:
            figures["image" if case.image else "text"].append(m)
        result = generate(pipe, case.prompt, [case.image] if case.image else [], system=SYSTEM,
                          sampling=SamplingParams(max_new_tokens=max_new_tokens))
        ours.append(list(result.token_ids))
    pipe.close()
    text, image = pool(figures["text"]), pool(figures["image"])
    greedy = greedy_agreement([r.greedy for _, r in usable], ours)
    bound = lookup("decoder", dec.id)
    extra = lookup("encoder", enc.id) if enc is not None else None  # the partner encoder's share of the KL
    checks = [check("token ids match transformers", float(not mismatched), 1.0, ">=")]
    if text:
        checks += [check("text mean KL", text["mean_kl"], bound and bound.max_kl, "<"),
                   check("text top-1", text["top1"], bound and bound.min_top1, ">=")]
    if image:
        checks += [check("image mean KL", image["mean_kl"], None if bound is None or extra is None
                         else bound.max_kl + extra.max_kl, "<"),
                   check("image top-1", image["top1"], bound and bound.min_top1, ">=")]
    for part, figures_ in (("text", text), ("image", image)):
        if figures_:
            near_tie(checks, part, figures_)
    checks.append(check("greedy exact", greedy["exact"], None, ">="))  # no table bounds it: reported only
    return {"kind": "decoder", "artifact": dec.id, "partner": enc.id if enc else None, "text": text, "image": image,
            "greedy": greedy, "greedy_tokens": ours, "mismatched": mismatched, "checks": checks,
            "seconds": time.perf_counter() - t0}


def measure_encoder(bundle: Bundle, enc: Artifact, dec: Artifact, cases: list[Case], refs: list[RefCase],
                    features: dict[str, np.ndarray], n_ctx: int, force: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    pipe = _load(bundle, dec, enc, n_ctx, force)
    image_cases = [(c, r) for c, r in zip(cases, refs) if c.image is not None]
    per_image = [compare(features[c.name], pipe.encode_images([c.image])[0].embeddings) for c, _ in image_cases]
    logits = [_logits(pipe, c, r) for c, r in image_cases]
    pipe.close()
    feats = {"cosine_min": min(f["cosine_min"] for f in per_image),
             "cosine_mean": float(np.mean([f["cosine_mean"] for f in per_image])),
             "max_abs": max(f["max_abs"] for f in per_image), "images": len(per_image)}
    image = pool([m for m in logits if m is not None])
    dec_bound, extra = lookup("decoder", dec.id), lookup("encoder", enc.id)
    floor = extra.min_cosine if extra else None
    checks = [check("token ids match transformers", float(all(m is not None for m in logits)), 1.0, ">="),
              check("cosine worst token", feats["cosine_min"], floor, ">="),
              check("image mean KL", image and image["mean_kl"],
                    None if dec_bound is None or extra is None else dec_bound.max_kl + extra.max_kl, "<")]
    return {"kind": "encoder", "artifact": enc.id, "partner": dec.id, "features": feats, "image": image,
            "checks": checks, "seconds": time.perf_counter() - t0}


# -- the whole run ---------------------------------------------------------------------------------
def validate(bundle_dir: Path, reference: Path, images_dir: Path | None = None, prompts_file: Path | None = None,
             max_new_tokens: int = 16, artifacts: list[str] | None = None, progress: bool = True,
             force: bool = False) -> dict[str, Any]:
    """Measure the bundle's artifacts against transformers and return the report (nothing is written)."""
    bundle = open_bundle(bundle_dir)
    manifest_sha = bundle.manifest_sha256
    chosen = select(bundle, artifacts or [])
    prompts = read_prompts(prompts_file)
    image_files = find_images(images_dir)
    if image_files and not bundle.has_vision:
        raise UserError(f"{images_dir}: {bundle.dir} is a text-only bundle (no vision part), so it is validated on "
                        f"prompts alone; drop --images")
    check_reference(reference, bundle)
    best_dec, best_enc = partner(bundle, "decoder"), partner(bundle, "encoder")
    if any(a.kind == "encoder" for a in chosen) and best_dec is None:
        raise UserError(f"{bundle.dir}: an encoder needs a decoder to be measured through, and this bundle has none")
    # hash once: each load would otherwise re-hash the (multi-GB) partner again for every artifact
    needed: list[Artifact] = []
    for a in [*chosen, best_dec, best_enc, bundle.vocab_artifact()]:  # Artifact holds dicts: unhashable
        if a is not None and a not in needed:
            needed.append(a)
    bundle.verify(needed)
    pairs = [(a, best_enc) if a.kind == "decoder" else (best_dec, a) for a in chosen]
    preflight(bundle, reference, pairs, 512 + int(bundle.config.get("tokens_per_image", 0)) + max_new_tokens, force)  # type: ignore[misc]
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    eos = set(bundle.config["eos_token_ids"])
    with tempfile.TemporaryDirectory(prefix="medgemma-validate-") as tmp:
        cases = make_cases(prompts, image_files, Path(tmp), with_images=bundle.has_vision)
        t0 = time.perf_counter()
        refs, features = run_reference(reference, cases, max_new_tokens, eos, progress)
        ref_seconds = time.perf_counter() - t0
        longest = max(len(r.ids) for r in refs) + max_new_tokens + 8
        n_ctx = max(512, -(-longest // 256) * 256)  # KV for what we run, not the default 4096
        rows = []
        for a in tqdm(chosen, desc="artifacts", unit="artifact", disable=not progress):
            log.info("validating %s %s", a.kind, a.id)
            if a.kind == "decoder":
                rows.append(measure_decoder(bundle, a, best_enc, cases, refs, max_new_tokens, n_ctx, force))
            else:
                rows.append(measure_encoder(bundle, a, best_dec, cases, refs, features, n_ctx, force))  # type: ignore[arg-type]
            gc.collect()
    ref_files = Checkpoint(reference).file_hashes()  # the same provenance hashes the manifest's source holds
    verdict = summarize(rows)
    return {
        "kind": "validation", "created": created, **verdict,
        "bundle": {"path": str(bundle.dir.resolve()), "manifest_sha256": manifest_sha},
        "reference": {"path": str(reference.resolve()), "sha256": _digest(ref_files), "files": ref_files,
                      "same_as_bundle_source": ref_files == (bundle.manifest.get("source") or {}).get("files"),
                      "model": reference_name(reference),
                      "seconds": ref_seconds},
        "inputs": {"system": SYSTEM, "max_new_tokens": max_new_tokens,
                   "cases": [{"name": c.name, "prompt": c.prompt, "image": c.source} for c in cases]},
        "partners": {"decoder": best_dec.id if best_dec else None, "encoder": best_enc.id if best_enc else None},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "reference_greedy_tokens": [r.greedy for r in refs],
        "artifacts": rows,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """passed, failures, no_threshold and near_ties of the measured rows (and each row's own `passed`)."""
    failures = [f"{r['kind']} {r['artifact']}: {c['figure']} {_fmt(c['value'])} (bound {c['op']} {_fmt(c['bound'])})"
                for r in rows for c in r["checks"] if c["passed"] is False]
    unbounded = sorted({f"{r['kind']} {r['artifact']}: {c['figure']}" for r in rows for c in r["checks"]
                        if c["passed"] is None and c["figure"] != "greedy exact" and not c.get("near_tie")})
    near_ties = [f"{r['kind']} {r['artifact']}: {c['figure']} {_fmt(c['value'])} (floor {_fmt(c['bound'])})"
                 + ("" if c.get("decisive_share") is None else f", decisive positions {c['decisive_share']:.0%}")
                 for r in rows for c in r["checks"] if c.get("near_tie")]
    for r in rows:
        r["passed"] = not any(c["passed"] is False for c in r["checks"])
    return {"passed": not failures, "failures": failures, "no_threshold": unbounded, "near_ties": near_ties}


def _digest(files: dict[str, str]) -> str:
    """One hash for a checkpoint folder: sha256 over its sorted `name sha256` lines."""
    return hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"
