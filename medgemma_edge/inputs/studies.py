"""A DICOM study as the model reads it: files found by content, grouped into series, each series checked
as a volume, and one series chosen (ordering and sampling: volumes.py).

- PATH is a folder (searched recursively, hidden files skipped, DICOM recognised by content), or one
  file (a multi-frame volume, or one slice). Slices are grouped by SeriesInstanceUID.
- Localizers (ImageType LOCALIZER) are dropped from a series, with a log line; non-image objects are skipped.

PHI: as in dicom.py, no tag value reaches a log record or an error, except Modality (a valid Code String),
sizes, counts, spacing and orientation labels. A series is shown by index and a digest of its UID.
"""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.dicom import (PROJECTION_MODALITIES, _code_string, _quiet_pydicom, _read, check_header,
                                        is_dicom)

log = logging.getLogger(__name__)

MAX_STUDY_FILES = 20000  # a whole-body CT study is a few thousand files; more is not one study
_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
_NON_IMAGE = {"SR": "a structured report", "RTSTRUCT": "an RT structure set", "RTPLAN": "an RT plan",
              "RTDOSE": "an RT dose grid", "RTRECORD": "an RT treatment record", "PR": "a presentation state",
              "KO": "a key-object selection", "SEG": "a segmentation", "REG": "a registration", "DOC": "a document"}
_NON_IMAGE_CLASSES = (("1.2.840.10008.5.1.4.1.1.88.", "a structured report"),
                      ("1.2.840.10008.5.1.4.1.1.11.", "a presentation state"),
                      ("1.2.840.10008.5.1.4.1.1.481.", "an RT object"), ("1.2.840.10008.1.3.10", "a DICOMDIR"),
                      ("1.2.840.10008.5.1.4.1.1.66.", "a segmentation or registration"),
                      ("1.2.840.10008.5.1.4.1.1.104.", "an encapsulated document"),
                      ("1.2.840.10008.5.1.4.1.1.9.", "a waveform"))
_FIX_SERIES = "run `medgemma-edge study-info PATH` and pick a volume with --series"


@dataclass(frozen=True)
class Slice:
    """One 2-D image of a series: a file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None  # None: a single-frame file
    rows: int
    cols: int
    instance: int | None  # InstanceNumber, or the frame index in a multi-frame file
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None  # 6 direction cosines: row, column
    rescale: tuple[float, float] | None = None  # per-frame (slope, intercept) of an enhanced multi-frame file
    monochrome: bool = True

    @property
    def name(self) -> str:
        return f"{self.path}" if self.frame is None else f"{self.path} (frame {self.frame})"


@dataclass
class Series:
    """The image slices sharing one SeriesInstanceUID (localizers apart), and why it is not a volume, if so."""

    uid: str
    modality: str
    slices: list[Slice] = field(default_factory=list)
    localizers: int = 0
    number: int | None = None  # SeriesNumber (an integer string, no PHI): only to list series in a stable order
    problem: str | None = None  # a one-line refusal naming the file, when this series cannot be read as a volume

    @property
    def digest(self) -> str:
        """8 hex digits identifying the series without showing its UID (UIDs can identify a patient)."""
        return hashlib.sha256(self.uid.encode()).hexdigest()[:8]

    @property
    def normal(self) -> np.ndarray | None:
        o = self.slices[0].orientation if self.slices else None
        if o is None:
            return None
        n = np.cross(np.asarray(o[:3]), np.asarray(o[3:]))
        norm = float(np.linalg.norm(n))
        return n / norm if norm > 1e-6 else None

    @property
    def orientation(self) -> str:
        """axial / coronal / sagittal / oblique from the plane normal (LPS axes), or "unknown"."""
        n = self.normal
        if n is None:
            return "unknown"
        axis = int(np.argmax(np.abs(n)))
        return ("sagittal", "coronal", "axial")[axis] if abs(n[axis]) >= 0.8 else "oblique"

    @property
    def is_volume(self) -> bool:
        return self.problem is None and bool(self.slices)


# -- reading -----------------------------------------------------------------------------------------
def dicom_files(path: Path) -> list[Path]:
    """The DICOM files at PATH (a file, or a folder searched recursively), by content; refuses none or too many."""
    path = Path(path)
    if path.is_file():
        if not is_dicom(path):
            raise UserError(f"{path}: not a DICOM file (no DICM marker); pass a DICOM series folder or file to --study")
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: study not found; pass a folder of DICOM files (or one multi-frame DICOM) to --study")
    found: list[Path] = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            p = Path(root) / name
            if name.startswith(".") or name.upper() == "DICOMDIR" or not p.is_file() or not is_dicom(p):
                continue
            found.append(p)
            if len(found) > MAX_STUDY_FILES:
                raise UserError(f"{path}: more than {MAX_STUDY_FILES} DICOM files; pass the folder of one study "
                                f"or one series")
    if not found:
        raise UserError(f"{path}: no DICOM files in this folder (files are recognised by their DICM marker); "
                        f"pass the folder an export from the PACS wrote")
    return found


def non_image_kind(ds: Any) -> str | None:
    """What a DICOM object is when it is not an image a volume can hold (None for an image)."""
    modality = _code_string(ds, "Modality") or ""
    sop = str(ds.get("SOPClassUID") or "")
    if sop == _WSI or modality == "SM":
        return "a whole-slide microscopy image"
    if modality in _NON_IMAGE:
        return _NON_IMAGE[modality]
    for prefix, kind in _NON_IMAGE_CLASSES:
        if sop.startswith(prefix):
            return kind
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return "not an image (no pixel data)"
    return None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _group(ds: Any, frame: int, group: str, attr: str) -> Any:
    """An attribute of an enhanced multi-frame file's functional groups: the frame's own, else the shared one."""
    for seq, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(seq)
        if items is not None and len(items) > index and items[index].get(group):
            value = items[index].get(group)[0].get(attr)
            if value is not None:
                return value
    return None


def _slices(path: Path, ds: Any, n_frames: int) -> list[Slice]:
    rows, cols, mono = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel") or 1) == 1
    top_o = _floats(ds.get("ImageOrientationPatient"), 6)
    if n_frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        pos = _floats(ds.get("ImagePositionPatient"), 3)
        return [Slice(path, None, rows, cols, _int(ds.get("InstanceNumber")), pos, top_o, None, mono)]
    out = []
    for f in range(n_frames):  # an enhanced multi-frame file: per-frame geometry and rescale
        rescale = _floats([_group(ds, f, "PixelValueTransformationSequence", k)
                           for k in ("RescaleSlope", "RescaleIntercept")], 2)
        pos = _floats(_group(ds, f, "PlanePositionSequence", "ImagePositionPatient"), 3)
        orient = _floats(_group(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"), 6) or top_o
        out.append(Slice(path, f, rows, cols, f, pos, orient, rescale, mono))
    return out


def scan(path: Path) -> list[Series]:
    """Every series at PATH, in a stable order (SeriesNumber, then the first file), each checked as a volume.

    Non-image objects are skipped (logged); a path that holds nothing else is refused naming the file.
    """
    series: dict[str, Series] = {}
    skipped: list[tuple[Path, str]] = []
    with _quiet_pydicom(Path(path)):
        for p in dicom_files(path):
            ds = _read(p, defer_size="64 KB")  # pixel data stays on disk
            kind = non_image_kind(ds)
            if kind is not None:
                skipped.append((p, kind))
                log.info("study: skipping %s: %s", p, kind)
                continue
            n_frames = check_header(p, ds)  # sizes and frame counts bounded before anything is decoded
            uid = str(ds.get("SeriesInstanceUID") or f"(no series UID) {p.parent}")
            modality = _code_string(ds, "Modality") or "unknown"
            s = series.setdefault(uid, Series(uid, modality, number=_int(ds.get("SeriesNumber"))))
            if modality != s.modality and s.problem is None:
                s.problem = (f"{p}: modality {modality} in a series of {s.modality} slices (mixed modalities in one "
                             f"series); a volume is one modality: export the series again or {_FIX_SERIES}")
            image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
            if "LOCALIZER" in image_type:
                s.localizers += 1
                log.info("study: dropping localizer %s", p)
                continue
            s.slices += _slices(p, ds, n_frames)
    if not series:
        first, kind = skipped[0]
        raise UserError(f"{first}: {kind}, not an image; --study expects CT or MR image slices (a series folder "
                        f"or a multi-frame image)")
    out = sorted(series.values(), key=lambda s: (1 << 30 if s.number is None else s.number,
                                                 str(s.slices[0].path) if s.slices else ""))
    for s in out:
        _check(s)
    return out


def _check(s: Series) -> None:
    """Set `problem` when the series cannot be one volume: no slices, projection films, sizes, colour."""
    if s.problem is not None:
        return
    if not s.slices:
        s.problem = f"series {s.digest}: only localizer images; {_FIX_SERIES}"
    elif s.modality in PROJECTION_MODALITIES:
        s.problem = (f"{s.slices[0].path}: {s.modality} is a projection radiograph, not a CT/MR volume; pass it "
                     f"with --image (and earlier films with --prior)")
    elif not all(sl.monochrome for sl in s.slices):
        odd = next(sl for sl in s.slices if not sl.monochrome)
        s.problem = f"{odd.name}: a colour image in a {s.modality} series; a volume has grayscale slices: {_FIX_SERIES}"
    else:
        sizes = [(sl.rows, sl.cols) for sl in s.slices]
        common = statistics.mode(sizes)
        odd = next((sl for sl in s.slices if (sl.rows, sl.cols) != common), None)
        if odd is not None:
            s.problem = (f"{odd.name}: a {odd.cols}x{odd.rows} slice in a series of {common[1]}x{common[0]} slices "
                         f"(slices of different sizes); export the series again or {_FIX_SERIES}")


# -- choosing and ordering -------------------------------------------------------------------------
def choose(series: list[Series], which: str | None = None) -> Series:
    """`which`: an index (as study-info lists them), a digest, or the full SeriesInstanceUID; default: the
    largest axial volume (CT and MR alike), else the largest volume. Refuses a chosen series that is no volume."""
    if which is not None:
        text = which.strip()
        hit = (series[int(text)] if text.isdigit() and int(text) < len(series) else
               next((s for s in series if text in (s.uid, s.digest)), None))
        if hit is None:
            raise UserError(f"--series {text}: no such series here (there are {len(series)}, numbered "
                            f"0..{len(series) - 1}); run `medgemma-edge study-info PATH` to list them")
        if hit.problem is not None:
            raise UserError(hit.problem)
        return hit
    volumes = [s for s in series if s.is_volume]
    if not volumes:
        raise UserError(series[0].problem or f"no series here can be read as a volume; {_FIX_SERIES}")
    axial = [s for s in volumes if s.orientation == "axial"]
    best = max(axial or volumes, key=lambda s: len(s.slices))  # max keeps the first of equals
    if len(volumes) > 1:
        log.info("study: %d volumes here; reading series %d (%s %s, %d slices); choose another with --series",
                 len(volumes), series.index(best), best.modality, best.orientation, len(best.slices))
    for s in (s for s in series if s.problem and len(s.slices) > len(best.slices)):  # a larger one is unreadable
        log.warning("study: skipping a larger series: %s", s.problem)
    return best
