"""The Ray engine: Ray Data reads the pending items; an actor pool holds one loaded pipeline per actor.

- Every node must see the bundle (and the inputs) at the same path; each actor loads and verifies the artifacts
  by sha256 on its own node and refuses a bundle that differs from the driver's (Target.load).
- The driver alone writes the results file, line by line as rows arrive, through the same sink and resume rule
  as the local engine; a row whose key already has a line (a task Ray retried) is dropped there.
- An actor whose process dies is restarted and its item retried (max_restarts / max_task_retries -1), so killing
  a worker loses no item. Killing the driver ends the job: run the same command again and it resumes.
- `ray_address` None starts a Ray instance on this machine for the run (and stops it after); "auto" or
  HOST:PORT joins a running cluster (`ray start --head` on one machine, `ray start --address` on the others).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from medgemma_edge.datasets.plan import EngineOptions, Pending, Sink
from medgemma_edge.datasets.items import Item
from medgemma_edge.datasets.jobs import Job, run_item
from medgemma_edge.errors import UserError

log = logging.getLogger(__name__)


class ItemWorker:
    """A Ray Data actor: loads the job's pipeline once (verified on this node), then answers one row at a time."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.pipe = job.target.load(job.model)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        lines = []
        for row in batch["row"]:
            p = json.loads(str(row))
            record = run_item(self.pipe, self.job, Item.from_row(p["item"]), p["key"], p["inputs"])
            lines.append(json.dumps(record, ensure_ascii=False))
        return {"line": lines}


def _ray(address: str | None) -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home, even where the network is open
    if address is not None and "RAY_AUTH_MODE" not in os.environ and _token_available():
        # a cluster started where a token exists requires it, but Ray 2.60's client sends it only when told to
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'medgemma-edge[cluster]' (on every node), or use "
                        "--engine local") from None
    return ray


def run_ray(job: Job, pending: Sequence[Pending], sink: Sink, options: EngineOptions) -> None:
    ray = _ray(options.ray_address)
    started = not ray.is_initialized()
    quiet = logging.WARNING if log.isEnabledFor(logging.DEBUG) else logging.ERROR  # -v shows Ray's own notes
    if started:
        try:
            ray.init(address=options.ray_address, include_dashboard=False, log_to_driver=False, logging_level=quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = options.ray_address or "a local Ray instance"
            raise UserError(f"--ray-address {where}: cannot connect to Ray ({_one_line(exc)}); start the cluster "
                            f"with `ray start --head` or check the address") from None
    try:
        cpus = float(ray.cluster_resources().get("CPU", 0))
        if cpus < options.cpus_per_worker:
            raise UserError(f"the Ray cluster has {cpus:g} CPUs, fewer than --cpus-per-worker "
                            f"{options.cpus_per_worker}; lower it or add nodes")
        _run(ray, job.with_threads(options.cpus_per_worker), pending, sink, options)
    finally:
        if started:
            ray.shutdown()


def _run(ray: Any, job: Job, pending: Sequence[Pending], sink: Sink, options: EngineOptions) -> None:
    from ray.data import ActorPoolStrategy, DataContext

    for name in ("ray", "ray.data"):  # Ray Data's executor logs each run at INFO on its own handler
        logging.getLogger(name).setLevel(logging.WARNING if log.isEnabledFor(logging.DEBUG) else logging.ERROR)
    context = DataContext.get_current()
    context.enable_progress_bars = False  # ours is on stderr already
    context.print_on_execution_start = False
    rows = [{"row": json.dumps({"item": p.item.to_row(), "key": p.key, "inputs": p.inputs})} for p in pending]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 1000))
    ds = ds.map_batches(ItemWorker, fn_constructor_kwargs={"job": job}, batch_size=1,
                        compute=ActorPoolStrategy(size=options.workers), num_cpus=options.cpus_per_worker)
    # Ray Data's defaults for actor pools (max_restarts=-1, max_task_retries=-1) keep every item when an actor
    # dies; an actor whose constructor raises (a node that refuses the bundle) fails the run at once.
    try:
        for row in ds.iter_rows():
            sink(json.loads(row["line"]))
    except Exception as exc:  # noqa: BLE001 - Ray wraps what an actor raised; a UserError keeps its one line
        cause = _user_error(exc)
        if cause is not None:
            raise cause from None
        raise


def _user_error(exc: BaseException) -> UserError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            return UserError(str(exc))
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return None


def _token_available() -> bool:
    """Ray's token sources: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (what `ray start` wrote)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path or Path.home() / ".ray" / "auth_token").is_file()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
