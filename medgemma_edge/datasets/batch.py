"""`run_job`: a job over a cohort into a resumable JSONL file; `batch` answers, `eval` scores (datasets/eval.py).

    items = read_items("cohort.jsonl")
    job = Job.make("answer", Target(bundle="/models/mg4b", cache_dir="/var/cache/mg"), sampling=SamplingParams())
    summary = run_job(job, items, "results.jsonl")           # run it again after a kill: it resumes

Items whose key already has a line are skipped (datasets/jobs.py defines the key; datasets/results.py the file).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medgemma_edge.datasets import engines
from medgemma_edge.datasets.plan import EngineOptions, Pending
from medgemma_edge.datasets.items import Item
from medgemma_edge.datasets.jobs import Job, input_hashes
from medgemma_edge.datasets.results import ResultLog
from medgemma_edge.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Summary:
    output: str
    items: int  # in the input
    done: int = 0  # lines written by this run (ok or error)
    failed: int = 0  # of which errors
    skipped: int = 0  # already had a line for the same key
    retried: int = 0  # error lines dropped to run again (retry_errors)
    other_lines: int = 0  # lines of other items, bundles or parameters, kept untouched
    repaired_bytes: int = 0  # a torn last line cut off when the file was opened
    wall_s: float = 0.0  # from the first item dispatched (load included) to the last line written
    load_s: float | None = None  # the local engine's model load
    keys: dict[str, str] = field(default_factory=dict)  # item id -> key (what eval reads back)

    @property
    def items_per_hour(self) -> float:
        return self.done / self.wall_s * 3600 if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("keys")
        out["items_per_hour"] = round(self.items_per_hour, 1)
        return out

    def line(self) -> str:
        return (f"done {self.done} (failed {self.failed}), skipped {self.skipped}, "
                f"{self.items_per_hour:,.1f} items/hour over {self.wall_s:.1f} s -> {self.output}")


def run_job(job: Job, items: Sequence[Item], output: Path | str, options: EngineOptions | None = None, *,
            retry_errors: bool = False, progress: bool = True,
            on_record: Callable[[dict[str, Any]], None] | None = None) -> Summary:
    """Run `job` over every item without a line in `output` yet; returns what happened."""
    options = options or EngineOptions()
    summary = Summary(str(output), len(items))
    with ResultLog(output) as results:
        summary.repaired_bytes = results.repaired
        pending: list[Pending] = []
        with tqdm(items, desc="checking inputs", unit="item", file=sys.stderr, leave=False,
                  disable=not progress or len(items) < 2) as bar:
            for item in bar:  # hashing is what makes resume exact: every input's bytes are read once
                inputs = input_hashes(item)
                key = job.key(item, inputs)
                summary.keys[item.id] = key
                pending.append(Pending(item, key, inputs))
        if retry_errors:
            summary.retried = results.drop_errors(p.key for p in pending)
        summary.skipped = sum(1 for p in pending if p.key in results.done)
        pending = [p for p in pending if p.key not in results.done]
        summary.other_lines = results.count_other(summary.keys.values())
        if summary.other_lines:
            log.info("%s: %d lines of other items or parameters are kept", output, summary.other_lines)

        bar = tqdm(total=len(pending), desc=f"{job.task} ({job.target.label})", unit="item", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)

        def sink(record: dict[str, Any]) -> None:
            if record["key"] in results.done:  # a task the engine retried after its line was written
                return
            if on_record is not None:  # the audit line first: a kill in between repeats it, never loses it
                on_record(record)
            results.append(record)
            summary.done += 1
            summary.failed += record.get("status") != "ok"
            summary.wall_s = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(failed=summary.failed, refresh=False)

        def loaded(info: dict[str, Any]) -> None:
            summary.load_s = info.get("load_s")

        t0 = time.perf_counter()
        try:
            engines.run(job, pending, sink, options, on_load=loaded)
        finally:
            bar.close()
            summary.wall_s = time.perf_counter() - t0 if pending else 0.0
        missing = [p.item.id for p in pending if p.key not in results.done]
        if missing:  # an engine must answer every item; say so rather than report a short run as complete
            raise UserError(f"{output}: {len(missing)} item(s) got no line (first: {missing[0]}); run the same "
                            f"command again to finish them")
    return summary


def audit_entry(record: dict[str, Any], include_text: bool = False) -> str:
    """The audit-log line of one batch result: the fields `run` writes (runtime/audit.py), from the result line."""
    import datetime as dt
    import json

    model = record.get("model", {})
    entry: dict[str, Any] = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "command": "batch",
        "bundle_id": model.get("bundle_id"),
        "artifacts": {k: model.get(k) for k in ("decoder", "encoder", "decoder_sha256", "encoder_sha256")},
        "inputs_sha256": record.get("inputs_sha256", []), "prompt_sha256": record.get("prompt_sha256"),
        "tokens": record.get("tokens"), "timings": record.get("timings"), "stop_reason": record.get("stop_reason"),
        "status": record.get("status"), "notice": record.get("notice"),
    }
    if include_text:
        entry["answer"] = record.get("answer")
    return json.dumps(entry, ensure_ascii=False) + "\n"
