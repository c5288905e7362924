"""Memory preflight: refuse a load that would not fit, with both figures, before llama.cpp tries.

An out-of-memory kill mid-answer is the worst failure on a shared workstation; an estimate that
errs a little high is the better trade.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medgemma_edge.errors import UserError

log = logging.getLogger(__name__)
GiB = float(1 << 30)


def available_bytes() -> int | None:
    """Memory the OS can give us now (Linux MemAvailable; elsewhere free physical pages; None if unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, AttributeError, OSError):  # macOS lacks the name, Windows lacks sysconf
        return None


def _pad(n: int, to: int = 256) -> int:
    return -(-n // to) * to


def kv_cells(config: dict[str, Any], n_ctx: int, n_batch: int, backend: str = "llama.cpp",
             swa_full: bool = False) -> list[int]:
    """KV cells each decoder layer allocates for a context of n_ctx (what the backend really allocates).

    Global layers keep the whole context. Sliding-window layers (Gemma 3: 5 in 6) keep only the window:
    - llama.cpp: pad256(min(n_ctx, window + n_ubatch)) cells (ref: llama-kv-cache-iswa.cpp, size_swa), or
      the whole context with `swa_full` (our decoder leaves it off and replays a rollback past the window,
      backends/llama_cpp/decoder.py truncate);
    - ONNX Runtime: a ring of window + chunk - 1 slots, chunk = max(tokens per image, min(window, 256))
      (backends/onnx/decoder.py), grown in steps of 256.
    """
    t = config["text"]
    types = t.get("layer_types") or ["full_attention"] * int(t["num_layers"])
    window = int(t.get("sliding_window") or 0)
    if backend == "onnx":
        chunk = max(int(config.get("tokens_per_image") or 0), min(window, 256))
        local = min(_pad(min(n_ctx, window + chunk - 1)), n_ctx)
    else:
        local = _pad(n_ctx) if swa_full else _pad(min(_pad(n_ctx), window + n_batch))
        n_ctx = _pad(n_ctx)
    return [local if kind == "sliding_attention" and window else n_ctx for kind in types]


def estimate(config: dict[str, Any], weights_bytes: int, n_ctx: int, n_batch: int, kv_bytes: int,
             with_vision: bool, cells: list[int] | None = None) -> dict[str, int]:
    """Bytes needed by part: weights (the files, read into memory), KV cache, logits buffer, vision activations.

    `cells`: KV cells per layer (kv_cells); default n_ctx on every layer.
    """
    t, v = config["text"], config.get("vision")
    cells = cells if cells is not None else [n_ctx] * int(t["num_layers"])
    kv = sum(cells) * 2 * t["num_kv_heads"] * t["head_dim"] * kv_bytes
    # llama.cpp keeps one float per vocabulary entry for every output row of a batch
    logits = n_batch * t["vocab_size"] * 4
    compute = n_batch * (2 * t["intermediate_size"] + 4 * t["hidden_size"]) * 4
    vision = 0
    if with_vision and v:
        patches = (v["image_size"] // v["patch_size"]) ** 2
        # both encoders tile attention (ORT MultiHeadAttention, mtmd flash attention), so one layer's
        # tensors dominate: several hidden-wide ones and the ~4x-wide MLP, in f32 (4B: 0.45 GB; measured 0.35-0.45)
        vision = patches * 24 * v["hidden_size"] * 4
    return {"weights": weights_bytes, "kv_cache": kv, "activations": logits + compute + vision}


def preflight(parts: dict[str, int], limit: int | None, force: bool, what: str,
              fix: str = "lower --ctx, choose a smaller --decoder, or pass --force") -> None:
    need = sum(parts.values())
    have = available_bytes() if limit is None else limit
    if have is None:
        log.warning("cannot tell how much memory is available here; pass --memory-limit GiB to check the %.2f GiB "
                    "this load needs", need / GiB)
        return
    detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in parts.items())
    log.info("memory estimate for %s: %.2f GiB (%s) of %.2f GiB available", what, need / GiB, detail, have / GiB)
    if need > have:
        if force:
            log.warning("continuing with %.2f GiB needed and %.2f GiB available (--force)", need / GiB, have / GiB)
            return
        raise UserError(f"{what}: needs about {need / GiB:.2f} GiB ({detail} GiB) but only {have / GiB:.2f} GiB "
                        f"is available; {fix}")


def vision_bytes_per_image(config: dict[str, Any]) -> int:
    """The vision activations of one image (the term `estimate` adds), which grow with an encoder batch."""
    v = config.get("vision") or {}
    if not v:
        return 0
    return (v["image_size"] // v["patch_size"]) ** 2 * 24 * v["hidden_size"] * 4


# On a CPU a batch only saves per-call overhead (measured at 4B: 8 images per call cost 0.96x per image and
# 4.8 GB more peak RSS than 1), so CPUs stop at 2; an accelerator keeps its cores busy with up to 8.
CPU_ENCODE_BATCH_CAP, ACCEL_ENCODE_BATCH_CAP = 2, 8


def encode_batch_size(per_image: int, available: int | None, on_cpu: bool = True) -> int:
    """Images per ONNX encoder call: as many as half the available memory holds, 1..the device's cap.

    The runtime's arena keeps what the largest batch needed, so a larger batch is paid for the whole run.
    """
    if per_image <= 0 or available is None:
        return 1
    cap = CPU_ENCODE_BATCH_CAP if on_cpu else ACCEL_ENCODE_BATCH_CAP
    return max(1, min(cap, available // 2 // per_image))


def largest_fitting(need: Any, have: int, high: int) -> int:
    """The largest n in 0..high with need(n) <= have (need grows with n): what a refusal can offer instead."""
    lo, hi = 0, high
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= have:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class SliceFit:
    """A study's context as a function of its slice count: fixed + n * per_slice tokens."""

    n_slices: int
    per_slice: int
    fixed: int

    def ctx(self, n: int) -> int:
        return self.fixed + n * self.per_slice


def preflight_slices(need_for: Callable[[int], dict[str, int]], fit: SliceFit, limit: int | None, force: bool,
                     what: str) -> None:
    """`preflight` for a study: when it does not fit, the refusal names the slice count that would."""
    have = available_bytes() if limit is None else limit
    fix = "choose a smaller --decoder, or pass --force"
    if have is not None and sum(need_for(fit.ctx(fit.n_slices)).values()) > have:
        k = largest_fitting(lambda n: sum(need_for(fit.ctx(n)).values()), have, fit.n_slices)
        fix = (f"--max-slices {k} would fit (or {fix})" if k else
               f"not even one slice fits beside the weights: {fix}")
    preflight(need_for(fit.ctx(fit.n_slices)), limit, force, f"{what} ({fit.n_slices} slices)", fix=fix)
