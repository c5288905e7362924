"""A series' slices in reading order, and sampled, as Google's MedGemma 1.5 CT notebook does.

- Order (`SLICE_ORDERS`): "instance" (default) by InstanceNumber, as the notebook (ref: google-health/medgemma
  notebooks/high_dimensional_ct_hugging_face.ipynb, cell iaaAbE6ARS8Q, `sorted(..., key=lambda i:
  int(i.InstanceNumber))`); "geometry" by ImagePositionPatient along the plane normal (ImageOrientationPatient
  row x column), ascending. Each falls back to the other when its tags are missing, and says so in the log.
- Sampling (`sample_indices`): the notebook's `int(round(i / M * (N - 1)))` for i = 1..M when N > M.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.studies import _FIX_SERIES, Series, Slice, choose, scan

log = logging.getLogger(__name__)

MAX_SLICES = 85  # ref: the CT notebook's MAX_SLICE
SLICE_ORDERS = ("instance", "geometry")


@dataclass
class Volume:
    """A series' slices in reading order, and how that order was found."""

    series: Series
    slices: list[Slice]
    order: str  # "instance" | "geometry" | "frames" (one multi-frame file without per-frame tags)
    spacing: float | None = None  # median distance between neighbouring slices (mm), when geometry is known
    gaps: int = 0  # neighbours more than 1.5 spacings apart: missing slices


def sample_indices(n: int, max_slices: int = MAX_SLICES) -> list[int]:
    """Google's CT notebook: all slices when n <= max_slices, else `int(round(i / M * (n - 1)))`, i = 1..M.

    Python's round (half to even) and i from 1, exactly as the notebook; not np.linspace.
    """
    if max_slices < 1:
        raise UserError(f"--max-slices {max_slices}: give at least 1")
    if n <= max_slices:
        return list(range(n))
    return [int(round(i / max_slices * (n - 1))) for i in range(1, max_slices + 1)]


def order(s: Series, how: str = "instance", quiet: bool = False) -> Volume:
    """The slices of a series in reading order (see the module docstring); refuses what cannot be ordered."""
    if how not in SLICE_ORDERS:
        raise UserError(f"--slice-order {how}: choose one of {', '.join(SLICE_ORDERS)}")
    if s.problem is not None:
        raise UserError(s.problem)
    slices = s.slices
    if len(slices) > 1 and len({sl.path for sl in slices}) == 1 and not any(sl.position for sl in slices):
        return Volume(s, list(slices), "frames")  # one multi-frame file without plane positions: as stored
    has_geometry = all(sl.position is not None and sl.orientation is not None for sl in slices)
    has_numbers = all(sl.instance is not None for sl in slices)
    if not has_geometry and not has_numbers:
        bad = next(sl for sl in slices if sl.instance is None and (sl.position is None or sl.orientation is None))
        raise UserError(f"{bad.name}: no ImagePositionPatient/ImageOrientationPatient and no InstanceNumber, so "
                        f"the slices cannot be ordered; export the series again with its geometry tags")
    if how == "geometry" and not has_geometry:
        (log.info if quiet else log.warning)("study: some slices lack ImagePositionPatient/ImageOrientationPatient; "
                                             "ordering by InstanceNumber instead")
        how = "instance"
    elif how == "instance" and not has_numbers:
        (log.info if quiet else log.warning)("study: some slices lack InstanceNumber; ordering by position along "
                                             "the slice normal instead")
        how = "geometry"
    if how == "instance":
        ordered = sorted(slices, key=lambda sl: sl.instance)  # type: ignore[arg-type,return-value]
        vol = Volume(s, ordered, "instance")
    else:
        normal = _common_normal(s)
        ordered = sorted(slices, key=lambda sl: float(np.dot(sl.position, normal)))  # type: ignore[arg-type]
        vol = Volume(s, ordered, "geometry")
    _spacing(vol, quiet)
    return vol


def _common_normal(s: Series) -> np.ndarray:
    first = np.asarray(s.slices[0].orientation)
    for sl in s.slices:
        if np.abs(np.asarray(sl.orientation) - first).max() > 1e-3:
            raise UserError(f"{sl.name}: its image plane differs from the series' first slice, so the series is "
                            f"not one volume to order by position; pass --slice-order instance or {_FIX_SERIES}")
    normal = s.normal
    if normal is None:
        raise UserError(f"{s.slices[0].name}: ImageOrientationPatient has parallel row and column directions; "
                        f"export the series again")
    return normal


def _spacing(vol: Volume, quiet: bool = False) -> None:
    """Median neighbour distance along the normal; gaps (missing slices) and duplicates go to the log."""
    normal = vol.series.normal
    if normal is None or len(vol.slices) < 2 or not all(sl.position for sl in vol.slices):
        return
    z = np.array([float(np.dot(sl.position, normal)) for sl in vol.slices])  # type: ignore[arg-type]
    steps = np.abs(np.diff(z))
    vol.spacing = float(np.median(steps))
    if vol.spacing > 0:
        vol.gaps = int((steps > 1.5 * vol.spacing).sum())
    if quiet:
        return
    if vol.gaps:
        log.warning("study: %d gap(s) between slice positions larger than 1.5x the spacing of %.3g mm "
                    "(missing slices?)", vol.gaps, vol.spacing)
    if int((steps < 1e-3 * max(vol.spacing, 1e-6)).sum()):
        log.warning("study: several slices share one position (two acquisitions in one series?)")


def load_volume(path: Path, which: str | None = None, how: str = "instance") -> tuple[list[Series], Volume]:
    """scan + choose + order: the series found, and the chosen one in reading order."""
    series = scan(path)
    return series, order(choose(series, which), how)


def describe(series: list[Series]) -> list[dict[str, Any]]:
    """What `study-info` lists: no UID, date, name or description, only what identifies no one.
    "default" marks the series --study reads without --series."""
    try:
        best: Series | None = choose(series)
    except UserError:
        best = None
    rows = []
    for i, s in enumerate(series):
        row: dict[str, Any] = {"index": i, "id": s.digest, "default": s is best, "modality": s.modality,
                               "orientation": s.orientation,
                               "slices": len(s.slices), "localizers_dropped": s.localizers,
                               "size": f"{s.slices[0].cols}x{s.slices[0].rows}" if s.slices else None,
                               "spacing_mm": None, "gaps": 0, "volume": s.is_volume}
        if s.is_volume:
            try:
                vol = order(s, "geometry", quiet=True)
                row.update(spacing_mm=None if vol.spacing is None else round(vol.spacing, 3), gaps=vol.gaps)
            except UserError as exc:
                row["note"] = str(exc).split(": ", 1)[-1]
        else:
            row["note"] = (s.problem or "").split(": ", 1)[-1]
        rows.append(row)
    return rows
