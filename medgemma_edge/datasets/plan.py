"""What an engine is handed: the pending items (each with its key and input hashes), how to run them, and the
sink that alone writes the results file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medgemma_edge.datasets.items import Item
from medgemma_edge.errors import UserError

ENGINES = ("local", "ray")
Sink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Pending:
    item: Item
    key: str
    inputs: list[str]


@dataclass(frozen=True)
class EngineOptions:
    engine: str = "local"
    ray_address: str | None = None  # None: a Ray instance of this machine alone, started and stopped here
    workers: int = 1  # actors (each holds one loaded pipeline)
    cpus_per_worker: int = 1  # CPUs Ray reserves per actor; also its threads unless the target sets them

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UserError(f"--engine {self.engine}: choose one of {', '.join(ENGINES)}")
        if self.engine == "local" and (self.ray_address is not None or self.workers != 1):
            raise UserError("--ray-address and --workers apply to --engine ray; add --engine ray or drop them")
