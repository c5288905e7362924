"""The checkpoint's generation_config.json, as the manifest records it: the recommended sampling values
and stop ids, read and checked here so the runtime (`--sampling model`) never has to see the checkpoint.

Only what sampling needs is kept, with transformers' meaning: `do_sample` false is greedy whatever the
other values say. A missing file records nothing; a value of the wrong type is dropped with a warning
(the file is advice, not weights, and transformers itself falls back to its defaults).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE = "generation_config.json"
FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty")
INTS = ("top_k",)


def read_generation_config(checkpoint_dir: Path) -> dict[str, Any] | None:
    """{"do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "eos_token_id"} as far
    as the checkpoint gives them; None without a generation_config.json."""
    path = Path(checkpoint_dir) / FILE
    if not path.is_file():
        log.info("%s: no %s; the bundle records no recommended sampling", checkpoint_dir, FILE)
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        log.warning("%s: unreadable (%s); the bundle records no recommended sampling", path, exc)
        return None
    if not isinstance(raw, dict):
        log.warning("%s: not a JSON object; the bundle records no recommended sampling", path)
        return None
    out: dict[str, Any] = {"do_sample": raw.get("do_sample") is True}
    for key in FLOATS + INTS:
        value = raw.get(key)
        if value is None:
            continue
        ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
              and (key not in INTS or float(value).is_integer()))
        if ok:
            out[key] = int(value) if key in INTS else float(value)
        else:
            log.warning("%s: %s %r is not a number; not recorded", path, key, value)
    eos = raw.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if isinstance(eos, list) and eos and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
        out["eos_token_id"] = eos
    return out
