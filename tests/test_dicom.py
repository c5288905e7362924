"""DICOM rendering on pydicom's own test files, against expectations computed here with plain numpy.

Rounding rule, in the module and here: clip, scale linearly to 0..255 in float64, np.rint (round
half to even, as MedGemma's `window_accurate` does with np.round), cast to uint8. Tolerance is +-1
where our float order of operations could differ from the module's; exact elsewhere.
No mocks: derived files are real DICOM files rewritten with pydicom with a few tags changed.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_files import CR_MONO1, arr, data, derived, local_test_files, one_line_error
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medgemma_edge.inputs.dicom import CT_WINDOWS_HU

# SC_rgb*.dcm: ten 10-row bands, sampled at column 50 (pydicom's own tests use these values)
PATTERN = np.array([[255, 0, 0], [255, 128, 128], [0, 255, 0], [128, 255, 128], [0, 0, 255],
                    [128, 128, 255], [0, 0, 0], [64, 64, 64], [192, 192, 192], [255, 255, 255]])


def scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.rint((np.clip(x.astype(np.float64), lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)


def close(a: np.ndarray, b: np.ndarray, tol: int) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= tol


def rounded_like(a: np.ndarray, b: np.ndarray) -> bool:
    """+-1 is float-order slack at .5 ties, rare: truncating instead of rounding is off on ~half."""
    return close(a, b, 1) and float(np.mean(a == b)) > 0.99


def hu_of(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)




def test_ct_packs_three_hu_windows_like_medgemma_serving_code():
    path = data("CT_small.dcm")
    hu = hu_of(path)  # slope 1, intercept -1024 in this file
    expected = np.stack([scale(hu, -1024, 1024), scale(hu, 135, 215), scale(hu, 0, 80)], axis=-1)
    got = arr(path)
    assert rounded_like(got, expected)
    # the G window is the serving code's 135..215 HU, not the notebook's -135..215
    assert CT_WINDOWS_HU[1] == (135.0, 215.0)
    assert not close(got[..., 1], scale(hu, -135, 215), 1)
    for ch in range(3):  # every window sees some contrast in this slice
        assert len(np.unique(got[..., ch])) > 10


# --- MR and other modalities: percentile window -----------------------------------------------

def test_mr_percentile_window():
    path = data("MR_small.dcm")
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    lo, hi = np.percentile(raw, [0.5, 99.5])
    expected = np.repeat(scale(raw, lo, hi)[..., None], 3, axis=-1)
    got = arr(path)
    assert rounded_like(got, expected)
    # the file's own WindowCenter/Width (600/1600) is not used for MR
    wc, ww = 600 - 0.5, 1600 - 1
    assert not close(got[..., 0], scale(raw, wc - ww / 2, wc + ww / 2), 1)


# --- projection radiography: modality LUT, VOI, MONOCHROME1 -----------------------------------

def linear_voi(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 'LINEAR', output range 0..255, then the module's rounding rule."""
    c, w = center - 0.5, width - 1
    y = ((x - c) / w + 0.5) * 255
    y = np.where(x <= c - w / 2, 0, np.where(x > c + w / 2, 255, y))
    return np.rint(y).astype(np.uint8)


def test_cr_window_from_tags():
    path = data(CR_MONO1)
    ds = pydicom.dcmread(path)
    assert (ds.Modality, ds.PhotometricInterpretation, float(ds.WindowCenter), float(ds.WindowWidth)) == ("CR", "MONOCHROME1", 1600, 2800)
    got = arr(path)
    expected = 255 - linear_voi(hu_of(path), 1600, 2800)  # modality LUT, window, then MONOCHROME1 inverted
    assert close(got, np.repeat(expected[..., None], 3, axis=-1), 1)
    assert not close(got[..., 0], 255 - scale(hu_of(path), hu_of(path).min(), hu_of(path).max()), 1)


def test_dx_window_first_of_several(tmp_path: Path):
    # CT_small's real 16-bit pixels relabelled DX, with two windows: the first one is used
    path = derived(tmp_path, "CT_small.dcm", "dx.dcm", Modality="DX", WindowCenter=[40, 500], WindowWidth=[400, 2000])
    got = arr(path)
    expected = linear_voi(hu_of(path), 40, 400)
    assert close(got[..., 0], expected, 1)
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()
    assert (got == 0).any() and (got == 255).any()  # the window clips on both sides
    assert not close(got[..., 0], linear_voi(hu_of(path), 500, 2000), 1)


def test_cr_without_voi_uses_full_range(tmp_path: Path):
    path = derived(tmp_path, CR_MONO1, "cr.dcm", WindowCenter=None, WindowWidth=None)
    x = hu_of(path)
    assert close(arr(path)[..., 0], 255 - scale(x, x.min(), x.max()), 1)


def test_voi_lut_sequence(tmp_path: Path):
    # a 12-bit ramp in a 16-bit LUT (common in the wild): scaled by the LUT's own output range
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 16])
    item.add_new("LUTData", "US", list(range(0, 4096, 16)))
    path = derived(tmp_path, "CT_small.dcm", "lut.dcm", Modality="DX", VOILUTSequence=Sequence([item]))
    idx = np.clip(np.rint(hu_of(path)), 0, 255).astype(int)
    expected = scale(np.arange(0, 4096, 16)[idx], 0, 4080)
    assert close(arr(path)[..., 0], expected, 1)


def test_invalid_window_falls_back_to_full_range(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = derived(tmp_path, "CT_small.dcm", "bad_window.dcm", Modality="DX", WindowCenter=40, WindowWidth=0)
    hu = hu_of(path)
    with caplog.at_level(logging.WARNING, logger="medgemma_edge.dicom"):
        assert close(arr(path)[..., 0], scale(hu, hu.min(), hu.max()), 1)
    assert any("full pixel range" in r.getMessage() for r in caplog.records)


def shipped_monochrome1() -> Path:
    """The first MONOCHROME1 file shipped with pydicom (the CR files under dicomdirtests/)."""
    for p in local_test_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if pydicom.dcmread(p, stop_before_pixels=True, force=True).get("PhotometricInterpretation") == "MONOCHROME1":
                    return p
            except Exception:
                continue
    raise AssertionError("pydicom ships no MONOCHROME1 file any more: derive one")


@pytest.mark.parametrize("keep_window", [True, False])
def test_monochrome1_is_inverted_after_windowing(tmp_path: Path, keep_window: bool):
    mono1 = shipped_monochrome1()
    drop = {} if keep_window else {"WindowCenter": None, "WindowWidth": None}
    mono1 = derived(tmp_path, mono1, "mono1.dcm", **drop)
    mono2 = derived(tmp_path, mono1, "mono2.dcm", PhotometricInterpretation="MONOCHROME2")
    a1, a2 = arr(mono1), arr(mono2)
    assert (a1 == 255 - a2).all()
    assert len(np.unique(a2)) > 20  # a real image, not a constant


# --- multi-frame ------------------------------------------------------------------------------

def test_multiframe_default_is_middle_frame():
    path = data("rtdose.dcm")  # 15 frames, RTDOSE -> percentile window
    frames = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert frames.shape[0] == 15
    lo, hi = np.percentile(frames[7], [0.5, 99.5])
    default = arr(path)
    assert close(default[..., 0], scale(frames[7], lo, hi), 1)
    assert (default == arr(path, 7)).all()
    assert not (default == arr(path, 0)).all()


def test_multiframe_colour_jpeg_middle_frame():
    path = data("examples_ybr_color.dcm")  # 30 frames, JPEG baseline, YBR_FULL_422
    assert (arr(path) == arr(path, 15)).all()
    assert not (arr(path) == arr(path, 0)).all()


@pytest.mark.parametrize("frame", [15, 99, -1])
def test_frame_out_of_range_is_one_line_user_error(frame: int):
    path = data("rtdose.dcm")
    msg = one_line_error(path, frame)
    assert f"frame {frame}" in msg and "15 frame" in msg and "0..14" in msg


def test_single_frame_file_only_has_frame_zero():
    path = data("CT_small.dcm")
    assert (arr(path, 0) == arr(path)).all()
    assert "1 frame" in one_line_error(path, 1)


# --- colour -----------------------------------------------------------------------------------

def bands(img: np.ndarray) -> np.ndarray:
    return img[5::10, 50].astype(int)


def test_rgb_uncompressed_is_passed_through():
    for name in ("SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm", "examples_rgb_color.dcm"):
        path = data(name)
        assert (arr(path) == pydicom.dcmread(path).pixel_array).all(), name


def test_ybr_full_422_is_converted_to_rgb():
    got = bands(arr(data("SC_ybr_full_422_uncompressed.dcm")))
    assert close(got, PATTERN, 5), got  # YBR is 8-bit and chroma-subsampled: (0, 255, 5) for green


def test_rgb_16bit_is_scaled_to_8bit():
    assert close(bands(arr(data("SC_rgb_rle_16bit.dcm"))), PATTERN, 1)
    assert close(bands(arr(data("SC_rgb_rle_32bit.dcm"))), PATTERN, 1)


def test_palette_colour_uses_the_lut():
    path = data("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    lut = pydicom.pixels.apply_color_lut(ds.pixel_array, ds)  # 16-bit entries here
    expected = np.rint(lut.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert close(arr(path), expected, 1)


# --- compressed transfer syntaxes -------------------------------------------------------------

def handler_available(path: Path) -> bool:
    from pydicom.pixels import get_decoder

    return get_decoder(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID).is_available


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_lossless_compressed_equals_uncompressed_twin(name: str):
    path = data(name)
    if not handler_available(path):
        assert "pip install" in one_line_error(path)
        return
    assert (arr(path) == arr(data("MR_small.dcm"))).all()


@pytest.mark.parametrize("name, tol", [("SC_rgb_rle.dcm", 0), ("SC_rgb_jpeg_gdcm.dcm", 0),
                                       ("SC_rgb_jpeg_dcmtk.dcm", 8), ("SC_rgb_dcmtk_+eb+cy+s2.dcm", 8),
                                       ("SC_rgb_gdcm_KY.dcm", 0)])
def test_compressed_colour_matches_pattern(name: str, tol: int):
    path = data(name)
    if not handler_available(path):
        assert "pip install" in one_line_error(path)
        return
    assert close(bands(arr(path)), PATTERN, tol), bands(arr(path))


def test_lossy_jpeg2000_ct_renders():
    path = data("693_J2KI.dcm")
    if not handler_available(path):
        assert "pip install pylibjpeg pylibjpeg-openjpeg" in one_line_error(path)
        return
    assert arr(path).shape == (512, 512, 3)


@pytest.mark.parametrize("blocked, expected", [
    ("pylibjpeg", "pip install pylibjpeg pylibjpeg-libjpeg"),  # not installed: pydicom finds no decoder
    ("libjpeg", "failed to import"),  # installed but broken: pydicom itself fails to import
])
def test_missing_or_broken_handler_is_one_line_user_error(blocked: str, expected: str):
    # a real interpreter in which one package cannot be imported (as if absent or broken)
    path = data("SC_rgb_jpeg_gdcm.dcm")  # JPEG Lossless SV1: only pylibjpeg (or gdcm) decodes it
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from pathlib import Path; from medgemma_edge.inputs.dicom import render; from medgemma_edge.errors import UserError\n"
            f"try:\n    render(Path({str(path)!r}))\n"
            "except UserError as e:\n    print('UserError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()
    assert out.count("\n") == 0 and out.startswith(f"UserError: {path}: "), out
    assert expected in out, out
    if blocked == "pylibjpeg":
        assert "JPEG Lossless" in out


def test_transfer_syntax_without_any_decoder(tmp_path: Path):
    path = tmp_path / "mpeg.dcm"  # CT_small's pixels wrapped as if they were an MPEG-2 stream
    ds = pydicom.dcmread(data("CT_small.dcm"))
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    ds.save_as(path)
    msg = one_line_error(path)
    assert "MPEG2 Main Profile" in msg and "uncompressed" in msg
