"""Every awkward image file is either handled (the RGB array is checked) or refused with one line naming it.

Files are real: written by Pillow, or (for headers Pillow will not write: zero size, absurd dimensions)
assembled chunk by chunk as valid PNGs with correct CRCs and genuinely compressed pixel data.
"""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.images import check_image_path, load_image, resize_square
from medgemma_edge.inputs.limits import MAX_PIXELS

CLI = Path(sys.executable).with_name("medgemma-edge")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def gray_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 8-bit PNG of any declared size: rows of zeros compress ~1000:1 (a real bomb)."""
    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def assert_refused(path: Path, *words: str) -> str:
    """The contract: UserError, one line, `{path}: {problem}; {fix}`, and the problem's key words."""
    with pytest.raises(UserError) as info:
        resize_square(path, 32)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and "; " in msg, msg
    for word in words:
        assert word in msg, msg
    return msg


def _mode(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def _pixels(path: Path, mode: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Plain Pillow, no EXIF handling: what transformers' processor sees when handed Image.open(path)."""
    with Image.open(path) as img:
        out = img.convert(mode)
        return np.asarray(out.resize(size) if size else out)


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20000x20000 = 400 MP, 390 KB on disk, 400 MB decoded: beyond Pillow's own error threshold."""
    return gray_png(tmp_path_factory.mktemp("bomb") / "bomb.png", 20000, 20000)


# -- refused -------------------------------------------------------------------------------------------
def test_pdf_is_refused(tmp_path: Path) -> None:
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")
    assert_refused(pdf, "not a readable image")
    with pytest.raises(UserError):  # the CLI's early check sees it too, before any model is loaded
        check_image_path(pdf)


def test_truncated_png_is_refused(tmp_path: Path) -> None:
    src = _save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), tmp_path / "a.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    assert_refused(cut, "truncated")


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    src = _save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), tmp_path / "a.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    assert_refused(cut, "truncated")


def test_corrupt_png_data_is_refused(tmp_path: Path) -> None:
    raw = bytearray(_save(Image.new("L", (32, 32), 90), tmp_path / "a.png").read_bytes())
    raw[raw.index(b"IDAT") + 6] ^= 0xFF  # inside the compressed data: the chunk CRC no longer matches
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(raw))
    assert_refused(bad)


def test_zero_size_is_refused(tmp_path: Path) -> None:
    assert_refused(gray_png(tmp_path / "empty.png", 0, 5), "zero-size")
    with pytest.raises(UserError, match="zero size"):  # an in-memory image reaches the same check
        resize_square(Image.new("L", (0, 3)), 32)


def test_decompression_bomb_is_refused_before_decoding(bomb_png: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    assert_refused(bomb_png, "too large", "before decoding")
    with pytest.raises(UserError, match="too large"):
        check_image_path(bomb_png)
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global is never touched


def test_pillow_bomb_warning_is_a_refusal_not_a_printed_warning(tmp_path: Path) -> None:
    # 10000x10000 = 100 MP: above Pillow's default warning level (89.5 MP), below its error level
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS  # precondition: the warning band
    big = gray_png(tmp_path / "big.png", 10000, 10000)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert_refused(big, "too large")
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_our_limit_holds_without_pillows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our limit does not depend on Pillow's global, which any library in the process may disable."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    over = gray_png(tmp_path / "over.png", 8193, 8192)
    msg = assert_refused(over, "too large")
    assert f"{MAX_PIXELS:,}" in msg
    with Image.open(over) as lazy, pytest.raises(UserError, match="too large"):  # a PIL image handed in: same limit
        resize_square(lazy, 32)
    check_image_path(gray_png(tmp_path / "at_limit.png", 8192, 8192))  # exactly the limit: accepted


def test_header_check_leaves_dicom_to_the_dicom_reader(tmp_path: Path) -> None:
    """check_image_path probes headers with Pillow, which cannot read DICOM: it must not refuse DICOM files;
    loading then goes to the DICOM renderer, which refuses this pixel-less stub in one line."""
    for name in ("scan.dcm", "scan-without-suffix"):
        path = tmp_path / name
        path.write_bytes(b"\0" * 128 + b"DICM" + b"\2\0\0\0UL\4\0")
        check_image_path(path)  # no error: the DICOM renderer, not Pillow, judges this file
        assert_refused(path, "no image pixel data")


# -- handled -------------------------------------------------------------------------------------------
GRADIENT_16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # row r holds r*256 .. r*256+255
ROWS_8 = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 256, axis=1)  # >> 8 gives r in every row


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


@pytest.mark.parametrize("ext", ["png", "tiff"])
def test_16bit_keeps_the_high_byte(tmp_path: Path, ext: str) -> None:
    path = _save(Image.fromarray(GRADIENT_16), tmp_path / f"g16.{ext}")
    assert _mode(path) == "I;16"
    np.testing.assert_array_equal(resize_square(path, 256), _rgb(ROWS_8))
    # why not transformers' convert("RGB"): it clips everything above 255, i.e. all but the first row
    assert (_pixels(path, "L")[1:] == 255).all()


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    path = _save(Image.fromarray(GRADIENT_16.astype(">u2")), tmp_path / "g16b.tiff")
    assert _mode(path) == "I;16B"
    np.testing.assert_array_equal(resize_square(path, 256), _rgb(ROWS_8))


def test_32bit_int_and_float_are_read_on_the_16bit_scale(tmp_path: Path) -> None:
    as_int = GRADIENT_16.astype(np.int32)
    as_int[0, :4] = [-5, -70000, 70000, 1 << 30]  # out of range: clipped to 0..65535 first
    expected = ROWS_8.copy()
    expected[0, :4] = [0, 0, 255, 255]
    path = _save(Image.fromarray(as_int), tmp_path / "g32.tiff")
    assert _mode(path) == "I"
    np.testing.assert_array_equal(resize_square(path, 256), _rgb(expected))

    as_float = GRADIENT_16.astype(np.float32) + 0.5  # the fraction is dropped, never rounded up a level
    as_float[0, :4] = [np.nan, -np.inf, np.inf, 1e9]
    path = _save(Image.fromarray(as_float), tmp_path / "f32.tiff")
    assert _mode(path) == "F"
    np.testing.assert_array_equal(resize_square(path, 256), _rgb(expected))


def test_12bit_data_in_16bit_png_comes_out_dark_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _save(Image.fromarray((GRADIENT_16 >> 4).astype(np.uint16)), tmp_path / "g12.png")  # 0..4095
    with caplog.at_level(logging.WARNING, logger="medgemma_edge.preprocess"):
        out = resize_square(path, 256)
    np.testing.assert_array_equal(out, _rgb(ROWS_8 >> 4))
    assert "nearly black" in caplog.text


def test_16bit_transparency_key_becomes_white(tmp_path: Path) -> None:
    path = _save(Image.fromarray(GRADIENT_16), tmp_path / "t16.png", transparency=0x1234)
    expected = ROWS_8.copy()
    expected[0x12, 0x34] = 255
    np.testing.assert_array_equal(resize_square(path, 256), _rgb(expected))


def test_grayscale(tmp_path: Path) -> None:
    gray = np.random.default_rng(1).integers(0, 256, (40, 40), np.uint8)
    np.testing.assert_array_equal(resize_square(_save(Image.fromarray(gray), tmp_path / "l.png"), 40), _rgb(gray))


def _on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return color.astype(np.float64) * a + 255 * (1 - a)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_on_white(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(2)
    bands = rng.integers(0, 256, (40, 40, len(mode)), np.uint8)
    path = _save(Image.fromarray(bands), tmp_path / f"{mode}.png")
    color = bands[..., :-1] if mode == "RGBA" else _rgb(bands[..., 0])
    np.testing.assert_allclose(resize_square(path, 40), _on_white(color, bands[..., -1]), atol=1)


def test_gray_with_transparency_key_is_composited_like_transformers(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.array([[0, 7], [7, 0]], np.uint8)), tmp_path / "key.png", transparency=0)
    np.testing.assert_array_equal(resize_square(path, 2)[..., 0], [[255, 7], [7, 255]])


PALETTE = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 30], [200, 200, 0]], np.uint8)


def _palette_image(index: np.ndarray) -> Image.Image:
    img = Image.fromarray(index).convert("L").convert("P")  # mode P, then our own palette
    img.putdata(index.ravel().tolist())
    img.putpalette(PALETTE.ravel().tolist())
    return img


@pytest.mark.parametrize("transparent", [None, 2])
def test_palette(tmp_path: Path, transparent: int | None) -> None:
    index = np.random.default_rng(3).integers(0, 4, (30, 30)).astype(np.uint8)
    kw = {} if transparent is None else {"transparency": transparent}
    path = _save(_palette_image(index), tmp_path / "p.png", **kw)
    assert _mode(path) == "P"
    expected = PALETTE[index]
    if transparent is not None:
        expected[index == transparent] = 255
    np.testing.assert_array_equal(resize_square(path, 30), expected)


def test_cmyk(tmp_path: Path) -> None:
    cmyk = np.random.default_rng(4).integers(0, 256, (20, 20, 4), np.uint8)
    path = _save(Image.frombytes("CMYK", (20, 20), cmyk.tobytes()), tmp_path / "c.tiff")
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    np.testing.assert_allclose(resize_square(path, 20), (255 - c) * (255 - k) / 255, atol=1)


def test_exif_rotated_jpeg_comes_out_upright(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:48, 0:80]
    upright = Image.fromarray(np.dstack([xx * 3, yy * 5, np.full_like(xx, 128)]).astype(np.uint8))  # 80 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels must be turned 90 degrees clockwise to display
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 90 counter-clockwise: what a camera sensor stores
    path = _save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95, subsampling=0)

    assert load_image(path).size == (80, 48)
    want = np.asarray(upright.resize((64, 64), Image.Resampling.BILINEAR)).astype(np.int16)
    got = resize_square(path, 64).astype(np.int16)
    assert np.abs(got - want).mean() < 3  # JPEG noise only
    ignoring_exif = _pixels(path, "RGB", (64, 64)).astype(np.int16)
    assert np.abs(ignoring_exif - want).mean() > 20  # the test can tell upright from sideways
    with Image.open(path) as opened:  # a PIL image handed in is turned upright too
        np.testing.assert_array_equal(resize_square(opened, 64), got)


def test_corrupt_exif_is_logged_with_the_file_name_not_printed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An Orientation tag whose data lies past the end: Pillow skips it with a UserWarning; we log it, naming the file."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1000, 6000) + struct.pack("<I", 0)
    path = _save(Image.new("RGB", (8, 4), (10, 200, 30)), tmp_path / "badexif.jpg", exif=b"Exif\0\0II*\0\x08\0\0\0" + ifd)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="medgemma_edge.preprocess"):
        warnings.simplefilter("always")
        assert load_image(path).size == (8, 4)  # orientation unknown: left as stored
    assert not caught, [str(w.message) for w in caught]
    assert f"{path}: " in caplog.text and "274" in caplog.text  # 274: the Orientation tag


# -- the CLI -------------------------------------------------------------------------------------------
def test_cli_refuses_a_bomb_in_one_line(tiny_bundle: Path, bomb_png: Path) -> None:
    res = subprocess.run([str(CLI), "run", "--bundle", str(tiny_bundle), "--image", str(bomb_png), "x"],
                         capture_output=True, text=True, timeout=300)
    shown = f"exit {res.returncode}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"
    assert res.returncode != 0, shown
    assert "Traceback" not in res.stdout + res.stderr, shown
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), shown
    assert str(bomb_png) in lines[0] and "too large" in lines[0], shown
