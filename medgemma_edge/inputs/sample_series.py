"""Synthetic DICOM series (a phantom, not a patient) for demos, benchmarks and tests: no real data needed.

A CT series holds an elliptical body (soft tissue), two lungs, a spine and a liver whose lesions change
from slice to slice, in Hounsfield units (stored value = HU + 1024, RescaleIntercept -1024). An MR series
holds the same shapes as arbitrary positive intensities. Every file is a valid DICOM file that pydicom
writes; the tags a study needs (UIDs, geometry, InstanceNumber) are set, names are "SYNTHETIC^PHANTOM".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def phantom_hu(size: int, z: float, rng: np.random.Generator) -> np.ndarray:
    """One axial slice of the phantom in HU, [size, size] int16; z in 0..1 moves through the body."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size * 2 - 1  # -1..1
    hu = np.full((size, size), -1000.0)  # air
    body = (xx / 0.85) ** 2 + (yy / 0.65) ** 2 < 1
    hu[body] = 40  # soft tissue
    lungs = ((np.abs(xx) - 0.4) / 0.25) ** 2 + (yy / 0.4) ** 2 < 1 - z  # lungs shrink towards the abdomen
    hu[lungs & body] = -800
    hu[(xx / 0.12) ** 2 + ((yy - 0.45) / 0.12) ** 2 < 1] = 700  # spine
    liver = ((xx + 0.3) / 0.35) ** 2 + ((yy + 0.05) / 0.3) ** 2 < z  # grows towards the abdomen
    hu[liver & body & ~lungs] = 60
    for k in range(3):  # hypodense lesions that come and go along z
        cx, cy, r = -0.35 + 0.12 * k, -0.1 + 0.08 * k, 0.06 * np.sin(np.pi * np.clip(z * 3 - k, 0, 1))
        hu[((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) & liver] = 10
    hu += rng.normal(0, 8, hu.shape)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def write_series(folder: Path, n_slices: int = 100, size: int = 512, modality: str = "CT", *,
                 spacing: float = 2.5, orientation: Sequence[float] = AXIAL, seed: int = 0,
                 series_uid: str | None = None, instance_numbers: Sequence[int] | None = None,
                 study_date: str = "20240102") -> list[Path]:
    """Write `n_slices` single-frame DICOM files into `folder` (file names in slice order); returns them.

    Positions step `spacing` mm along the plane normal of `orientation`; InstanceNumber 1..n unless given.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    o = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(o[:3], o[3:])
    study, series, frame_of_reference = generate_uid(), series_uid or generate_uid(), generate_uid()
    sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
    numbers = list(instance_numbers) if instance_numbers is not None else list(range(1, n_slices + 1))
    paths = []
    for i in range(n_slices):
        hu = phantom_hu(size, i / max(n_slices - 1, 1), rng)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.StudyDate = "SYNTHETIC^PHANTOM", "PHANTOM", study_date
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, numbers[i]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [float(v) for v in o]
        ds.ImagePositionPatient = [float(v) for v in (-size / 2 * np.asarray(o[:3]) - size / 2 * np.asarray(o[3:])
                                                      + normal * spacing * i)]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], spacing
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        if modality == "CT":
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
            stored = (hu.astype(np.int32) + 1024).astype(np.uint16)
        else:  # MR: arbitrary units, no rescale
            stored = (hu.astype(np.int32) + 1024).astype(np.uint16) // 2
        ds.PixelData = stored.tobytes()
        path = folder / f"slice{i:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
