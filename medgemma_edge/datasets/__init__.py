"""Cohorts: batch answers and evaluation over many items, resumable, on one machine or a Ray cluster.

    from medgemma_edge.datasets import Job, Target, read_items, run_job
    summary = run_job(Job.make("answer", Target(bundle="B"), prompt="Describe this X-ray"), read_items("cxr/"),
                      "results.jsonl")
"""

from medgemma_edge.datasets.batch import Summary, run_job
from medgemma_edge.datasets.plan import EngineOptions
from medgemma_edge.datasets.items import Item, read_items
from medgemma_edge.datasets.jobs import Job, Target

__all__ = ["EngineOptions", "Item", "Job", "Summary", "Target", "read_items", "run_job"]
