"""Studies from DICOM: real series from pydicom's test data, and synthetic ones written here with pydicom
(shuffled files, a tilted plane, two series in one folder, a missing slice, MR, a localizer, an enhanced
multi-frame volume). Expected order, sampling and windowed pixels are computed here from the tags with
plain numpy and Pillow, never by calling the code under test; refusals are one line naming the file.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.sample_series import write_series
from medgemma_edge.inputs.slices import WINDOWINGS, ct_rgb, render_volume
from medgemma_edge.inputs.studies import choose, scan
from medgemma_edge.inputs.volumes import describe, load_volume, order, sample_indices

pytestmark = pytest.mark.unit
TEST_FILES = Path(DATA_ROOT) / "test_files"
SIZE = 32  # the square the slices are rendered to here


def tilted(deg: float) -> list[float]:
    """Row along x, column tilted by `deg` about x (a gantry tilt)."""
    a = np.radians(deg)
    return [1.0, 0.0, 0.0, 0.0, float(np.cos(a)), float(np.sin(a))]


def rewrite(path: Path, out: Path | None = None, **tags: object) -> Path:
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(out or path)
    return out or path


def one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and "; " in msg, msg
    return msg


def expected_order(paths: list[Path], how: str) -> list[Path]:
    """From the tags alone: InstanceNumber, or the position along the normal of the plane."""
    ds = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in paths}
    if how == "instance":
        return sorted(paths, key=lambda p: int(ds[p].InstanceNumber))
    o = np.asarray(ds[paths[0]].ImageOrientationPatient, float)
    n = np.cross(o[:3], o[3:])
    return sorted(paths, key=lambda p: float(np.dot(np.asarray(ds[p].ImagePositionPatient, float), n)))


def notebook_pixels(path: Path, size: int) -> np.ndarray:
    """The CT notebook's windowing, its JPEG transport (PIL, quality 75), then transformers' bilinear resize."""
    dcm = pydicom.dcmread(path)
    hu = pydicom.pixels.apply_rescale(dcm.pixel_array, dcm)
    rgb = np.round(np.stack([(np.clip(hu, lo, hi).astype(np.float32) - lo) / (hi - lo) * np.float32(255)
                             for lo, hi in [(-1024, 1024), (-135, 215), (0, 80)]], -1), 0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="jpeg")
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB").resize((size, size), Image.BILINEAR))


# --- sampling -----------------------------------------------------------------------------------------

def test_sampling_is_the_notebooks_formula() -> None:
    for n in [1, 2, 84, 85, 86, 100, 128, 300, 1000]:
        expected = list(range(n)) if n <= 85 else [int(round(i / 85 * (n - 1))) for i in range(1, 86)]
        assert sample_indices(n) == expected
    assert sample_indices(128)[:6] == [1, 3, 4, 6, 7, 9] and sample_indices(128)[-2:] == [126, 127]
    assert sample_indices(300)[:4] == [4, 7, 11, 14]
    assert sample_indices(128) != np.round(np.linspace(0, 127, 85)).astype(int).tolist()  # not linspace
    assert sample_indices(10, 4) == [2, 4, 7, 9]
    with pytest.raises(UserError):
        sample_indices(10, 0)


# --- real DICOM (pydicom's test data) ---------------------------------------------------------------

def test_real_study_with_cr_films_and_a_ct_series() -> None:
    folder = TEST_FILES / "dicomdirtests" / "77654033"
    series = scan(folder)
    rows = describe(series)
    assert sorted(r["modality"] for r in rows) == ["CR", "CR", "CR", "CT"]
    assert all(not r["volume"] and "projection" in r["note"] for r in rows if r["modality"] == "CR")
    ct_files = sorted((folder / "CT2").iterdir())
    chosen = choose(series)
    assert chosen.modality == "CT" and chosen.orientation == "axial" and len(chosen.slices) == len(ct_files) == 4
    for how in ("instance", "geometry"):
        vol = order(chosen, how)
        assert [sl.path for sl in vol.slices] == expected_order(ct_files, how)
    vol = order(chosen, "geometry")
    z = sorted(float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in ct_files)
    assert vol.spacing == pytest.approx(float(np.median(np.diff(z)))) and vol.gaps == 1  # -99.5 .. 103.0 mm


def test_real_ct_slices_are_windowed_like_the_notebook() -> None:
    folder = TEST_FILES / "dicomdirtests" / "98892001"
    _, vol = load_volume(folder)  # CT5N: 5 axial slices (CT2N is 2 slices of different planes)
    assert vol.series.orientation == "axial" and len(vol.slices) == 5
    got = render_volume(vol, sample_indices(len(vol.slices)), SIZE)
    assert [r.label for r in got] == [f"SLICE {n}" for n in range(1, 6)]
    for r in got:
        np.testing.assert_array_equal(np.asarray(r.image), notebook_pixels(r.source.path, SIZE))


def test_real_localizer_series_and_a_series_of_different_planes() -> None:
    series = scan(TEST_FILES / "dicomdirtests" / "98892001")
    scouts = next(s for s in series if s.localizers)  # CT2N: two LOCALIZER images, a series of its own
    assert scouts.localizers == 2 and not scouts.slices and not scouts.is_volume
    assert choose(series) is next(s for s in series if s.slices)
    radial = scan(TEST_FILES / "dicomdirtests" / "98892003" / "MR700")[0]  # 7 MR slices, each its own plane
    with pytest.raises(UserError) as exc:
        order(radial, "geometry")
    msg = str(exc.value)
    assert "\n" not in msg and "image plane differs" in msg and any(str(sl.path) in msg for sl in radial.slices)
    assert [sl.instance for sl in order(radial, "instance").slices] == list(range(1, 8))  # the notebook's order


@pytest.mark.parametrize("name, kind", [("rtstruct.dcm", "RT structure set"), ("test-SR.dcm", "structured report"),
                                        ("rtplan.dcm", "RT plan")])
def test_non_image_objects_are_refused(tmp_path: Path, name: str, kind: str) -> None:
    src = TEST_FILES / name
    with pytest.raises(UserError) as exc:
        scan(src)
    assert kind in one_line(exc, src)
    folder = tmp_path / "study"
    folder.mkdir()
    shutil.copy(src, folder / ("object" if pydicom.misc.is_dicom(src) else "object.dcm"))  # by content, or suffix
    target = next(folder.iterdir())
    with pytest.raises(UserError) as exc:
        scan(folder)
    one_line(exc, target)


# --- synthetic series --------------------------------------------------------------------------------

def test_shuffled_files_are_ordered_from_the_tags(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = write_series(tmp_path / "s", 40, size=16, instance_numbers=list(rng.permutation(40) + 1))
    for i, p in enumerate(rng.permutation(paths)):  # file names say nothing about the order
        p.rename(p.with_name(f"f{i:03d}"))
    files = sorted((tmp_path / "s").iterdir())
    for how in ("instance", "geometry"):
        _, vol = load_volume(tmp_path / "s", how=how)
        assert [sl.path for sl in vol.slices] == expected_order(files, how)
    assert expected_order(files, "instance") != expected_order(files, "geometry")  # numbers were shuffled


def test_tilted_plane_with_in_plane_shifts(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s", 20, size=16, orientation=tilted(25), instance_numbers=list(range(20, 0, -1)))
    o = np.asarray(tilted(25))
    rng = np.random.default_rng(1)
    for p in paths:  # shift each slice within its plane: sorting on x, y or z alone would scramble them
        ds = pydicom.dcmread(p)
        ipp = np.asarray(ds.ImagePositionPatient, float) + rng.uniform(-30, 30) * o[:3] + rng.uniform(-30, 30) * o[3:]
        rewrite(p, ImagePositionPatient=[float(v) for v in ipp])
    geo = expected_order(paths, "geometry")
    for axis in range(3):
        by_axis = sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[axis]))
        assert by_axis != geo
    series, vol = load_volume(tmp_path / "s", how="geometry")
    assert [sl.path for sl in vol.slices] == geo == paths
    assert vol.spacing == pytest.approx(2.5) and vol.gaps == 0 and series[0].orientation == "axial"
    assert [sl.path for sl in load_volume(tmp_path / "s")[1].slices] == paths[::-1]  # InstanceNumber runs back


def test_two_series_in_one_folder_default_and_choice(tmp_path: Path) -> None:
    write_series(tmp_path / "study" / "a", 12, size=16, seed=1)
    write_series(tmp_path / "study" / "b", 30, size=16, seed=2, orientation=[1, 0, 0, 0, 0, -1])  # coronal
    write_series(tmp_path / "study" / "c", 20, size=16, seed=3)
    write_series(tmp_path / "study" / "d", 50, size=16, seed=4, modality="MR", orientation=[0, 1, 0, 0, 0, -1])
    series = scan(tmp_path / "study")
    rows = describe(series)
    assert sorted((r["modality"], r["orientation"], r["slices"]) for r in rows) == [
        ("CT", "axial", 12), ("CT", "axial", 20), ("CT", "coronal", 30), ("MR", "sagittal", 50)]
    best = choose(series)
    assert (best.orientation, len(best.slices)) == ("axial", 20)  # the largest axial one, not the largest
    coronal = next(r for r in rows if r["orientation"] == "coronal")
    assert len(choose(series, str(coronal["index"])).slices) == 30
    assert len(choose(series, coronal["id"]).slices) == 30
    assert choose(series, series[3].uid) is series[3]
    with pytest.raises(UserError, match="no such series"):
        choose(series, "9")


def test_a_missing_slice_is_a_gap(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s", 10, size=16)
    paths[4].unlink()
    _, vol = load_volume(tmp_path / "s", how="geometry")
    assert [sl.path for sl in vol.slices] == paths[:4] + paths[5:]
    assert vol.gaps == 1 and vol.spacing == pytest.approx(2.5)


def test_mr_is_normalised_over_the_series_not_per_slice(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "mr", 6, size=16, modality="MR")
    for i, p in enumerate(paths):  # each slice its own range: per-slice scaling would give 0..255 everywhere
        ds = pydicom.dcmread(p)
        px = ds.pixel_array.astype(np.uint16) // (i + 1) + 100 * i
        ds.PixelData = px.astype(np.uint16).tobytes()
        ds.save_as(p)
    raw = [pydicom.dcmread(p).pixel_array.astype(np.float64) for p in paths]
    lo, hi = min(r.min() for r in raw), max(r.max() for r in raw)
    _, vol = load_volume(tmp_path / "mr")
    got = render_volume(vol, list(range(6)), 16, "notebook")
    for r, values in zip(got, raw):
        gray = np.round((values - lo) / (hi - lo) * 255.0, 0).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(np.repeat(gray[..., None], 3, -1)).save(buf, format="jpeg")
        np.testing.assert_array_equal(np.asarray(r.image), np.asarray(Image.open(buf).convert("RGB")))
    assert max(int(np.asarray(r.image).max()) for r in got[1:]) < 250  # only the brightest slice reaches white


def test_a_localizer_in_the_series_is_dropped(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s", 8, size=16)
    scout = rewrite(paths[0], tmp_path / "s" / "scout.dcm", SOPInstanceUID=pydicom.uid.generate_uid(),
                    ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
                    InstanceNumber=100)
    ds = pydicom.dcmread(scout)
    ds.Rows, ds.PixelData = 8, ds.pixel_array[:8].tobytes()
    ds.save_as(scout)
    series, vol = load_volume(tmp_path / "s", how="geometry")
    assert [sl.path for sl in vol.slices] == paths and series[0].localizers == 1


def test_enhanced_multiframe_volume(tmp_path: Path) -> None:
    """One file, per-frame positions and rescale in functional groups, frames stored in reverse order."""
    src = write_series(tmp_path / "src", 4, size=16)
    frames = [pydicom.dcmread(p) for p in src][::-1]
    ds = frames[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.NumberOfFrames = 4
    ds.PixelData = b"".join(f.PixelData for f in frames)
    per = []
    for k, f in enumerate(frames):
        item, pos, pvt = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = f.ImagePositionPatient
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 2 if k == 1 else 1, -1024, "HU"
        item.PlanePositionSequence, item.PixelValueTransformationSequence = Sequence([pos]), Sequence([pvt])
        per.append(item)
    shared, orient = Dataset(), Dataset()
    orient.ImageOrientationPatient = ds.ImageOrientationPatient
    shared.PlaneOrientationSequence = Sequence([orient])
    ds.PerFrameFunctionalGroupsSequence, ds.SharedFunctionalGroupsSequence = Sequence(per), Sequence([shared])
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "RescaleSlope", "RescaleIntercept"):
        delattr(ds, key)
    ds.save_as(tmp_path / "volume.dcm")
    _, vol = load_volume(tmp_path / "volume.dcm", how="geometry")
    assert [sl.frame for sl in vol.slices] == [3, 2, 1, 0]  # ascending position along the normal
    got = render_volume(vol, [2], 16, "serving")[0]  # frame 1, whose slope is 2
    hu = frames[1].pixel_array.astype(np.float64) * 2 - 1024
    rgb = np.stack([np.round(np.interp(np.clip(np.round(hu), lo, hi), (lo, hi), (0, 255))) for lo, hi in
                    [(-1024, 1024), (135, 215), (0, 80)]], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    np.testing.assert_array_equal(np.asarray(got.image), np.asarray(Image.open(buf).convert("RGB")))


# --- windowing presets ---------------------------------------------------------------------------------

def test_window_presets_against_both_google_sources() -> None:
    hu = np.arange(-2000, 3000, dtype=np.float64).reshape(50, 100)
    notebook = ct_rgb(hu, WINDOWINGS["notebook"])
    serving = ct_rgb(hu, WINDOWINGS["serving"])
    for ch, (lo, hi) in enumerate([(-1024, 1024), (-135, 215), (0, 80)]):
        x = np.clip(hu, lo, hi).astype(np.float32)
        expected = np.round((x - lo) / np.float32(hi - lo) * np.float32(255), 0).astype(np.uint8)
        assert (notebook[..., ch] == expected).all()
    for ch, (lo, hi) in enumerate([(-1024, 1024), (135, 215), (0, 80)]):
        expected = np.round(np.interp(np.clip(hu, lo, hi), (lo, hi), (0, 255)), 0).astype(np.uint8)
        assert (serving[..., ch] == expected).all()
    water = hu == 0
    assert notebook[..., 1][water].item() == 98 and serving[..., 1][water].item() == 0  # G: -135..215 vs 135..215
    assert (notebook[..., [0, 2]] == serving[..., [0, 2]]).all()  # R and B agree


# --- refusals ------------------------------------------------------------------------------------------

def test_refusals_name_the_file(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "mixed", 4, size=16)
    rewrite(paths[2], Modality="MR")
    with pytest.raises(UserError) as exc:
        load_volume(tmp_path / "mixed")
    assert "mixed modalities" in one_line(exc, paths[2])

    paths = write_series(tmp_path / "nogeo", 4, size=16)
    rewrite(paths[1], ImagePositionPatient=None, InstanceNumber=None)
    with pytest.raises(UserError) as exc:
        load_volume(tmp_path / "nogeo")
    assert "cannot be ordered" in one_line(exc, paths[1])

    paths = write_series(tmp_path / "sizes", 4, size=16)
    ds = pydicom.dcmread(paths[3])
    ds.Rows, ds.Columns, ds.PixelData = 8, 8, ds.pixel_array[:8, :8].copy().tobytes()
    ds.save_as(paths[3])
    with pytest.raises(UserError) as exc:
        load_volume(tmp_path / "sizes")
    assert "different sizes" in one_line(exc, paths[3])

    paths = write_series(tmp_path / "pr", 1, size=16)
    pr = rewrite(paths[0], Modality="PR", SOPClassUID="1.2.840.10008.5.1.4.1.1.11.1", PixelData=None)
    with pytest.raises(UserError) as exc:
        load_volume(tmp_path / "pr")
    assert "presentation state" in one_line(exc, pr)

    paths = write_series(tmp_path / "wsi", 1, size=16)
    wsi = rewrite(paths[0], Modality="SM", SOPClassUID="1.2.840.10008.5.1.4.1.1.77.1.6")
    with pytest.raises(UserError) as exc:
        load_volume(tmp_path / "wsi")
    assert "whole-slide" in one_line(exc, wsi)


def test_no_phi_in_logs_or_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secrets = {"PatientName": "DOE^JANE^SECRETNAME", "PatientID": "SECRETID42", "StudyDate": "19700101",
               "SeriesDescription": "SECRETDESC", "InstitutionName": "SECRETHOSPITAL"}
    paths = write_series(tmp_path / "s", 6, size=16)
    for p in paths:
        rewrite(p, **secrets)
    rewrite(paths[5], Modality="MR")
    caplog.set_level(logging.DEBUG)
    series = scan(tmp_path / "s")
    text = caplog.text + repr(describe(series)) + str(series[0].problem)
    render_volume(order(series[0].__class__(series[0].uid, "CT", series[0].slices[:5])), list(range(5)), 16)
    text += caplog.text
    uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    for value in [*secrets.values(), uid]:
        assert value not in text
