"""pydicom's shipped test files and the checks both DICOM test modules use (never downloaded, never mocked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.data.data_manager import DATA_ROOT

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.dicom import render

CR_MONO1 = "dicomdirtests/77654033/CR1/6154"  # a real CR: MONOCHROME1, slope/intercept, WC/WW, no suffix


def data(name: str) -> Path:
    """A file shipped inside pydicom (never downloaded: get_testdata_files() would try the network)."""
    nested = Path(DATA_ROOT) / "test_files" / name
    path = str(nested) if "/" in name and nested.is_file() else get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not shipped with this pydicom"
    return Path(path)


def local_test_files() -> list[Path]:
    return sorted(p for p in (Path(DATA_ROOT) / "test_files").rglob("*") if p.is_file())


def arr(path: Path, frame: int | None = None) -> np.ndarray:
    img = render(path, frame)
    assert img.mode == "RGB"
    out = np.asarray(img)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    return out



def derived(tmp: Path, src: str | Path, name: str, **tags: object) -> Path:
    """A real DICOM file (a pydicom test file name, or a path) rewritten with some tags changed."""
    ds = pydicom.dcmread(src if isinstance(src, Path) else data(src))
    for key, value in tags.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    out = tmp / name
    ds.save_as(out)
    return out



def one_line_error(path: Path, frame: int | None = None) -> str:
    with pytest.raises(UserError) as info:
        render(path, frame)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and "; " in msg, msg
    return msg
