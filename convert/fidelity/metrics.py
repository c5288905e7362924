"""Fidelity metrics, pure numpy: logit parity (KL, top-1, margin-aware top-1) and feature cosine.

Their bounds live in the precision table (medgemma_edge/bundle/precisions.py), next to the artifact type.
"""

from __future__ import annotations

import numpy as np

CHUNK = 32  # prompt positions per KL chunk: float64 temporaries stay ~32 x 262k x 8 B x a few (~0.3 GB)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def parity(ref: np.ndarray, ours: np.ndarray) -> dict[str, float]:
    """Per-position KL(ref || ours), top-1 agreement and max |logit difference| over a prompt."""
    lp, lq = log_softmax(ref), log_softmax(ours)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return {
        "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
        "top1": float((ref.argmax(-1) == ours.argmax(-1)).mean()),
        "max_abs": float(np.abs(ref - ours).max()),
    }


def top2_margin(logits: np.ndarray) -> np.ndarray:
    part = np.sort(logits, axis=-1)[..., -2:]
    return part[..., 1] - part[..., 0]


def decisive_top1(ref: np.ndarray, ours: np.ndarray) -> tuple[float, bool]:
    """(share of decisive positions, top-1 agreement at all of them).

    A position is decisive when the reference's top-2 margin exceeds twice our largest logit error
    there; below that no backend with that error could be held to the order. llama.cpp's CPU GELU
    looks activations up in an fp16 table (ggml-cpu/vec.h, GGML_GELU_FP16): a ~0.5% relative floor.
    """
    decisive = top2_margin(ref) > 2 * np.abs(ref - ours).max(axis=-1)
    return float(decisive.mean()), bool((ref.argmax(-1) == ours.argmax(-1))[decisive].all())


def decisive_counts(ref: np.ndarray, ours: np.ndarray) -> tuple[int, int]:
    """(decisive positions, how many of them agree on top-1): the rule of `decisive_top1`, as counts that pool."""
    decisive = top2_margin(ref) > 2 * np.abs(ref - ours).max(axis=-1)
    return int(decisive.sum()), int((ref.argmax(-1) == ours.argmax(-1))[decisive].sum())


def compare(ref: np.ndarray, ours: np.ndarray) -> dict[str, float]:
    """Per-token cosine (min and mean over every token of every image) and max |difference|."""
    ref64, ours64 = ref.astype(np.float64), ours.astype(np.float64)
    cos = (ref64 * ours64).sum(-1) / (np.linalg.norm(ref64, axis=-1) * np.linalg.norm(ours64, axis=-1) + 1e-30)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "max_abs": float(np.abs(ref64 - ours64).max()), "ref_max_abs": float(np.abs(ref64).max())}


def chunked_parity(ref: np.ndarray, ours: np.ndarray) -> dict[str, float]:
    """`parity` over position chunks: same figures, bounded float64 temporaries."""
    n = len(ref)
    kl_sum = top1_sum = 0.0
    max_kl = max_abs = 0.0
    n_decisive = n_agree = 0
    for i in range(0, n, CHUNK):
        m = parity(ref[i:i + CHUNK], ours[i:i + CHUNK])
        d, a = decisive_counts(ref[i:i + CHUNK], ours[i:i + CHUNK])
        k = min(CHUNK, n - i)
        kl_sum += m["mean_kl"] * k
        top1_sum += m["top1"] * k
        n_decisive, n_agree = n_decisive + d, n_agree + a
        max_kl, max_abs = max(max_kl, m["max_kl"]), max(max_abs, m["max_abs"])
    return {"mean_kl": kl_sum / n, "max_kl": max_kl, "top1": top1_sum / n, "max_abs": max_abs, "positions": n,
            **_decisive(n_decisive, n_agree, n)}


def _decisive(n_decisive: int, n_agree: int, n: int) -> dict[str, float | int | None]:
    """Margin-aware top-1 beside plain top-1: agreement at the decisive positions, and their share."""
    return {"decisive_positions": n_decisive, "decisive_agree": n_agree, "decisive_share": n_decisive / n,
            "decisive_top1": n_agree / n_decisive if n_decisive else None}


def pool(per_case: list[dict[str, float]]) -> dict[str, float] | None:
    """Position-weighted figures over several prompts."""
    if not per_case:
        return None
    n = sum(m["positions"] for m in per_case)
    n_decisive, n_agree = sum(m["decisive_positions"] for m in per_case), sum(m["decisive_agree"] for m in per_case)
    return {"mean_kl": sum(m["mean_kl"] * m["positions"] for m in per_case) / n,
            "max_kl": max(m["max_kl"] for m in per_case),
            "top1": sum(m["top1"] * m["positions"] for m in per_case) / n,
            "max_abs": max(m["max_abs"] for m in per_case), "positions": n, "prompts": len(per_case),
            **_decisive(n_decisive, n_agree, n)}


def greedy_agreement(ref: list[list[int]], ours: list[list[int]]) -> dict[str, float]:
    """Share of prompts whose whole greedy answer matches, and the mean length of the matching prefix."""
    prefix = []
    for r, o in zip(ref, ours):
        k = 0
        while k < min(len(r), len(o)) and r[k] == o[k]:
            k += 1
        prefix.append(k)
    return {"exact": float(np.mean([r == o for r, o in zip(ref, ours)])), "prefix_mean": float(np.mean(prefix)),
            "reference_tokens_mean": float(np.mean([len(r) for r in ref])), "prompts": len(ref)}
