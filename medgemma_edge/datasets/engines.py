"""Engines run a job's pending items and hand each finished line to `sink`, which alone writes the results file.

- `local`: one pipeline in this process, items in order. A workstation needs nothing else.
- `ray`: Ray Data over an actor pool, one loaded pipeline per actor, on one machine or a cluster
  (datasets/ray_engine.py; the `cluster` extra).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from medgemma_edge.datasets.jobs import Job, run_item
from medgemma_edge.datasets.plan import EngineOptions, Pending, Sink

log = logging.getLogger(__name__)


def run(job: Job, pending: Sequence[Pending], sink: Sink, options: EngineOptions,
        on_load: Callable[[dict[str, Any]], None] | None = None) -> None:
    if not pending:
        return
    if options.engine == "ray":
        from medgemma_edge.datasets.ray_engine import run_ray

        run_ray(job, pending, sink, options)
        return
    run_local(job, pending, sink, on_load)


def run_local(job: Job, pending: Sequence[Pending], sink: Sink,
              on_load: Callable[[dict[str, Any]], None] | None = None) -> None:
    pipe = job.target.load(job.model)
    try:
        if on_load is not None:
            on_load({"load_s": pipe.info.get("load_s", 0.0)})
        for p in pending:
            sink(run_item(pipe, job, p.item, p.key, p.inputs))
        store = pipe.store
        log.info("encoder calls %d; embedding store %s", pipe.encoder_calls, store.stats() if store else "off")
    finally:
        pipe.close()
