"""Property-based fuzzing of every parser that reads user-supplied bytes: manifest, images, GGUF headers.

The property is always the same: a value of the right shape, or a `UserError` whose message is one line
and names the file; never any other exception (the CLI would print "internal error"), never a hang or a
huge allocation. Mutations start from real files (the tiny bundle's manifest and GGUFs, Pillow-written
PNG/JPEG), so most inputs get past the magic bytes and into the interesting code.
Bounded: <= 100 examples per target, no deadline (the machine may be busy), no example database writes.
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from medgemma_edge.bundle import MANIFEST, Bundle, open_bundle
from medgemma_edge.errors import UserError
from medgemma_edge.bundle.gguf_header import GgufHeader, read_gguf_header
from medgemma_edge.inputs.images import load_image, resize_square

# MEDGEMMA_FUZZ_EXAMPLES=5000 for a deeper local hunt; the suite default stays at 100 per target.
FUZZ = settings(max_examples=int(os.environ.get("MEDGEMMA_FUZZ_EXAMPLES", "100")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_HEADER_ALLOC = 8 << 20  # bytes: a 64 KiB header needs far less; a trusted 2**60 count would need exabytes


class Blob(bytes):
    """Seed file bytes: a short repr, so a failing example prints the edits, not half a megabyte."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


def assert_clear_error(exc: UserError, path: Path) -> None:
    msg = str(exc)
    assert "\n" not in msg and str(path) in msg, msg


# -- mutations -----------------------------------------------------------------------------------------
# Values that break parsers: zero, sign bits, all-ones, and the 2**60 "count" that must never be trusted.
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, 1 << 60, (1 << 63) - 1, (1 << 64) - 1]
position = st.integers(0, 1 << 32)  # taken modulo the current length


@st.composite
def mutation(draw: st.DrawFn, hot: int) -> tuple[str, int, bytes]:
    """One edit; half of them land in the first `hot` bytes (the header), where the parsing happens."""
    pos = draw(st.one_of(st.integers(0, hot), position))
    kind = draw(st.sampled_from(["flip", "int", "insert", "delete", "truncate"]))
    if kind == "flip":
        return kind, pos, bytes([draw(st.integers(1, 255))])
    if kind == "int":
        width, order = draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from(["<", ">"]))
        value = draw(st.sampled_from(INTERESTING) | st.integers(0, (1 << 64) - 1)) % (1 << (8 * width))
        return kind, pos, value.to_bytes(width, "little" if order == "<" else "big")
    if kind == "insert":
        return kind, pos, draw(st.binary(min_size=1, max_size=16))
    return kind, pos, bytes([draw(st.integers(1, 255))])  # delete: how many bytes


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in edits:
        at = pos % (len(buf) + 1)
        if kind == "flip" and at < len(buf):
            buf[at] ^= arg[0]
        elif kind == "int":
            buf[at:at + len(arg)] = arg
        elif kind == "insert":
            buf[at:at] = arg
        elif kind == "delete":
            del buf[at:at + arg[0]]
        elif kind == "truncate":
            del buf[at:]
    return bytes(buf)


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every PNG chunk CRC, so a mutation reaches the decoder instead of failing the checksum."""
    buf, at = bytearray(data), 8
    while at + 12 <= len(buf):
        (length,) = struct.unpack_from(">I", buf, at)
        end = at + 8 + length
        if end + 4 > len(buf):
            break
        struct.pack_into(">I", buf, end, zlib.crc32(buf[at + 4:end]))
        at = end + 4
    return bytes(buf)


def mutations(hot: int) -> st.SearchStrategy[list[tuple[str, int, bytes]]]:
    return st.lists(mutation(hot), min_size=1, max_size=6)


# -- manifest ------------------------------------------------------------------------------------------
# json.dumps writes NaN/Infinity for non-finite floats and json.loads reads them back: keep them in, and
# draw the values that break int()/len()/indexing often, not once in thousands of examples.
SPECIAL_JSON = [float("inf"), float("-inf"), float("nan"), 1e308, 2**64, -1, 0, "", "..", "/etc/passwd", [], {}, None, True]
json_values = st.recursive(
    st.sampled_from(SPECIAL_JSON) | st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("manifest") / "bundle"


@pytest.fixture(scope="module")
def real_manifest(tiny_bundle: Path) -> dict[str, Any]:
    return json.loads((tiny_bundle / MANIFEST).read_text())  # read only: the bundle is session-wide


def check_manifest(directory: Path, raw: bytes) -> None:
    directory.mkdir(exist_ok=True)
    (directory / MANIFEST).write_bytes(raw)
    try:
        bundle = open_bundle(directory)
    except UserError as exc:
        assert_clear_error(exc, directory)
        return
    assert isinstance(bundle, Bundle)
    for a in bundle.artifacts:  # what the loader does next with a manifest it accepted
        assert bundle.find(a.kind, a.id).id == a.id
    with pytest.raises(UserError):
        bundle.find("decoder", "gguf:no-such-precision")


@FUZZ
@given(raw=st.binary(max_size=4096))
def test_manifest_arbitrary_bytes(manifest_dir: Path, raw: bytes) -> None:
    check_manifest(manifest_dir, raw)


@FUZZ
@given(value=json_values)
def test_manifest_arbitrary_json(manifest_dir: Path, value: Any) -> None:
    check_manifest(manifest_dir, json.dumps(value).encode())


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a JSON tree (root excluded): the places an edit can land, each equally likely."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    return [p for k, child in items for p in [(*prefix, k), *_paths(child, (*prefix, k))]]


@FUZZ
@given(data=st.data())
def test_manifest_real_with_random_edits(manifest_dir: Path, real_manifest: dict[str, Any], data: st.DataObject) -> None:
    manifest = json.loads(json.dumps(real_manifest))  # a deep copy
    paths = _paths(real_manifest)
    read = [p for p in paths if p[0] in ("artifacts", "config", "format", "format_version")]  # what the runtime reads
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        *parents, key = data.draw(st.sampled_from(read) | st.sampled_from(paths), label="path")
        parent: Any = manifest
        for k in parents:  # an earlier edit may have removed or replaced part of this path
            parent = parent[k] if isinstance(parent, (dict, list)) and _has(parent, k) else None
        if not (isinstance(parent, (dict, list)) and _has(parent, key)):
            continue
        if data.draw(st.booleans(), label="delete"):
            del parent[key]
        else:
            parent[key] = data.draw(json_values, label="value")
    check_manifest(manifest_dir, json.dumps(manifest).encode())


def _has(node: dict | list, key: Any) -> bool:
    return key in node if isinstance(node, dict) else isinstance(key, int) and key < len(node)


def test_manifest_deep_nesting_is_a_clear_error(manifest_dir: Path) -> None:
    """100k nested brackets: json's recursion limit must not escape as RecursionError."""
    check_manifest(manifest_dir, b"[" * 100_000 + b"]" * 100_000)


# -- images --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seed_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("seeds")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 20, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "rgb.png": (rgb, {}),
        "gray16.png": (Image.fromarray(rng.integers(0, 65536, (12, 20)).astype(np.uint16)), {}),
        "palette.png": (rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), {"transparency": 3}),
        "rgba.png": (rgb.convert("RGBA"), {}),
        "rgb.jpg": (rgb, {"quality": 90}),
        "exif.jpg": (rgb, {"exif": exif}),
        "gray.jpg": (rgb.convert("L"), {"progressive": True}),
        "gray16.tiff": (Image.fromarray(rng.integers(0, 65536, (12, 20)).astype(np.uint16)), {}),
    }
    out = {}
    for name, (img, kw) in files.items():
        img.save(d / name, **kw)
        out[name] = Blob((d / name).read_bytes())
    return out


@FUZZ
@given(seed=st.sampled_from(["rgb.png", "gray16.png", "palette.png", "rgba.png", "rgb.jpg", "exif.jpg", "gray.jpg",
                             "gray16.tiff"]),
       edits=mutations(hot=256), recrc=st.booleans())
# found by CI's fuzzing: a later TIFF directory without dimensions, parsed by n_frames (TypeError, EXIF warnings)
@example(seed="gray16.tiff", edits=[("insert", 75, b"\x00\x00\x00\x00")], recrc=False)
def test_images_mutated(tmp_path: Path, seed_images: dict[str, bytes], seed: str, edits: list, recrc: bool) -> None:
    path = tmp_path / f"fuzz-{seed}"
    data = mutate(seed_images[seed], edits)
    path.write_bytes(fix_png_crcs(data) if recrc and seed.endswith(".png") else data)
    with warnings.catch_warnings(record=True) as caught:  # Pillow's warnings must become log lines, not stderr noise
        warnings.simplefilter("always")
        try:
            img = load_image(path)
            out = resize_square(path, 16)
        except UserError as exc:
            assert_clear_error(exc, path)
            return
        finally:
            assert not caught, [str(w.message) for w in caught]
    assert img.width > 0 and img.height > 0
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


# -- GGUF headers --------------------------------------------------------------------------------------
def _artifact(bundle: Path, prefix: str) -> Path:
    manifest = json.loads((bundle / MANIFEST).read_text())
    files = sorted(a["file"] for a in manifest["artifacts"] if a["format"] == "gguf" and a["file"].startswith(prefix))
    return bundle / min(files, key=lambda f: (bundle / f).stat().st_size)


@pytest.fixture(scope="module")
def decoder_head(tiny_bundle: Path) -> bytes:
    with _artifact(tiny_bundle, "decoder").open("rb") as f:
        return Blob(f.read(64 << 10))


@pytest.fixture(scope="module")
def mmproj(tiny_bundle: Path) -> bytes:
    return Blob(_artifact(tiny_bundle, "mmproj").read_bytes())


@pytest.fixture(scope="module")
def mmproj_data_end(tiny_bundle: Path) -> int:
    return read_gguf_header(_artifact(tiny_bundle, "mmproj")).data_end


def check_gguf(path: Path) -> None:
    """A header or a clear error, and Python allocations bounded while reading (tracemalloc: bytes, not time)."""
    was_tracing = tracemalloc.is_tracing()  # e.g. PYTHONTRACEMALLOC=1: measure on top, leave it running
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    try:
        header = read_gguf_header(path)
    except UserError as exc:
        assert_clear_error(exc, path)
        return
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if not was_tracing:
            tracemalloc.stop()
        grew = peak - before
        assert grew < MAX_HEADER_ALLOC, f"reading a {path.stat().st_size}-byte header allocated {grew} bytes"
    assert isinstance(header, GgufHeader) and header.data_end <= path.stat().st_size


@FUZZ
@given(edits=mutations(hot=1024))
def test_gguf_decoder_head_mutated(tmp_path: Path, decoder_head: bytes, edits: list) -> None:
    path = tmp_path / "head.gguf"
    path.write_bytes(mutate(decoder_head, edits))
    check_gguf(path)


@FUZZ
@given(edits=mutations(hot=3072))
def test_gguf_mmproj_mutated(tmp_path: Path, mmproj: bytes, edits: list) -> None:
    path = tmp_path / "mmproj.gguf"
    path.write_bytes(mutate(mmproj, edits))
    check_gguf(path)


@FUZZ
@given(cut=st.integers(0, 1 << 32))
def test_gguf_mmproj_truncated(tmp_path: Path, mmproj: bytes, mmproj_data_end: int, cut: int) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(mmproj[: cut % len(mmproj)])
    check_gguf(path)
    if cut % len(mmproj) < mmproj_data_end:  # cutting into a tensor (not just trailing padding) is refused
        with pytest.raises(UserError):
            read_gguf_header(path)


def _field_offsets(data: bytes) -> dict[str, int]:
    """Offsets of the header's count fields: tensor count, KV count, first key's length, first array's count."""
    first_array = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 8  # skip type, item type
    assert struct.unpack_from("<II", data, first_array - 8) == (9, 8)  # an array of strings
    return {"n_tensors": 8, "n_kv": 16, "key_length": 24, "array_count": first_array}


@pytest.mark.parametrize("field", ["n_tensors", "n_kv", "key_length", "array_count"])
def test_gguf_count_of_2_pow_60_is_refused_without_allocating(tmp_path: Path, decoder_head: bytes, field: str) -> None:
    buf = bytearray(decoder_head)
    struct.pack_into("<Q", buf, _field_offsets(decoder_head)[field], 1 << 60)
    path = tmp_path / f"{field}.gguf"
    path.write_bytes(bytes(buf))
    check_gguf(path)  # bounded allocation
    with pytest.raises(UserError, match="corrupt|truncated"):
        read_gguf_header(path)


def _gguf(n_kv: int, kv: bytes, n_tensors: int = 0, tensors: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensors


def _key(name: str, vtype: int) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", vtype)


# Hostile headers that random mutation is unlikely to hit but a crafted file would (found by reading the reader).
CRAFTED = {  # what the reader did before it was fixed, in the comments
    "nested_arrays": _gguf(1, _key("x", 9) + struct.pack("<IQ", 9, 1) * 20_000),  # RecursionError
    "alignment_zero": _gguf(1, _key("general.alignment", 4) + struct.pack("<I", 0)),  # ZeroDivisionError
    "alignment_nan": _gguf(1, _key("general.alignment", 6) + struct.pack("<f", float("nan"))),  # ValueError
    "alignment_not_power_of_2": _gguf(1, _key("general.alignment", 4) + struct.pack("<I", 24)),  # accepted
    "alignment_string": _gguf(1, _key("general.alignment", 8) + struct.pack("<Q", 2) + b"32"),  # accepted via int()
    "too_many_dims": _gguf(0, b"", 1, struct.pack("<Q", 1) + b"t" + struct.pack("<I", 1 << 31) + b"\0" * 64),  # "truncated"
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_gguf_crafted_headers_are_refused(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(CRAFTED[case])
    check_gguf(path)
    with pytest.raises(UserError, match="corrupt"):
        read_gguf_header(path)


# -- ONNX files, before and inside ONNX Runtime -----------------------------------------------------------
@pytest.fixture(scope="module")
def vision_onnx(tiny_bundle: Path) -> bytes:
    bundle = open_bundle(tiny_bundle)
    return Blob(bundle.path(bundle.find("encoder", "onnx:int8")).read_bytes())


@FUZZ
@given(edits=mutations(hot=4096))
def test_onnx_mutated(tmp_path: Path, vision_onnx: bytes, edits: list) -> None:
    """A damaged .onnx is refused in one line by our session factory; ONNX Runtime must not take the process down."""
    from medgemma_edge.backends.onnx.session import make_session

    path = tmp_path / "vision.onnx"
    path.write_bytes(mutate(vision_onnx, edits))
    try:
        make_session(path, ["CPUExecutionProvider"], 1)
    except UserError as exc:
        assert_clear_error(exc, path)
