"""Comparing time points: prior films before the current ones, as Google's longitudinal CXR notebook shows
them (ref: google-health/medgemma notebooks/cxr_longitudinal_comparison_with_hugging_face.ipynb: one user
turn [image(before), image(after), text(prompt)], no labels, no dates).

When every image is DICOM with a StudyDate, priors are sorted oldest first, and a prior dated after a
current image is refused (the two were probably swapped). Dates reach the prompt only with
--dicom-context, and never an error or a log line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.dicom import _quiet_pydicom, _read, dicom_context, is_dicom

log = logging.getLogger(__name__)

_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")  # ref: PS3.5 6.2, VR DA (YYYYMMDD)


def study_date(path: Path) -> str | None:
    """StudyDate of a DICOM file as YYYY-MM-DD (None when absent, malformed, or not DICOM)."""
    if not is_dicom(Path(path)):
        return None
    with _quiet_pydicom(Path(path)):
        value = _read(Path(path), stop_before_pixels=True).get("StudyDate")
    m = _DATE.fullmatch(str(value).strip()) if isinstance(value, str) else None
    return f"{m[1]}-{m[2]}-{m[3]}" if m else None


def order_images(current: Sequence[Path], priors: Sequence[Path]) -> list[Path]:
    """Priors (oldest first when all are dated), then the current images, in the order the prompt shows them."""
    if not priors:
        return list(current)
    if not current:
        raise UserError("--prior needs the current image too: pass it with --image")
    dates = {p: study_date(p) for p in [*priors, *current]}
    if all(dates.values()):
        priors = sorted(priors, key=lambda p: dates[p])  # stable: same-day priors keep their order
        newest_prior, oldest_current = priors[-1], min(current, key=lambda p: dates[p])
        if dates[newest_prior] > dates[oldest_current]:  # type: ignore[operator]
            raise UserError(f"{newest_prior}: this --prior was acquired after the current image {oldest_current} "
                            f"(StudyDate); swap --prior and --image")
        log.info("priors ordered by StudyDate, oldest first")
    else:
        log.info("priors kept in the order given (not every image has a DICOM StudyDate)")
    return [*priors, *current]


def comparison_context(paths: Sequence[Path], n_priors: int) -> str:
    """--dicom-context for a comparison: per image, prior or current, its date and the dicom_context fields."""
    lines = []
    for i, p in enumerate(paths):
        what = "prior" if i < n_priors else "current"
        fields = [dicom_context(p)] if is_dicom(p) else []
        if date := study_date(p):
            fields.append(f"Study date: {date}.")
        if fields := [f for f in fields if f]:
            lines.append(f"Image {i + 1} ({what}): " + " ".join(fields))
    return "\n".join(lines)
