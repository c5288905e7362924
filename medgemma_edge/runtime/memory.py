"""Memory preflight: refuse a load that would not fit, with both figures, before llama.cpp tries.

An out-of-memory kill mid-answer is the worst failure on a shared workstation; an estimate that
errs a little high is the better trade.
"""

from __future__ import annotations

import logging
import os
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


def estimate(config: dict[str, Any], weights_bytes: int, n_ctx: int, n_batch: int, kv_bytes: int,
             with_vision: bool) -> dict[str, int]:
    """Bytes needed by part: weights (the files, read into memory), KV cache, logits buffer, vision activations."""
    t, v = config["text"], config.get("vision")
    kv = t["num_layers"] * n_ctx * 2 * t["num_kv_heads"] * t["head_dim"] * kv_bytes
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


def preflight(parts: dict[str, int], limit: int | None, force: bool, what: str) -> None:
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
                        f"is available; lower --ctx, choose a smaller --decoder, or pass --force")
