"""ONNX vision encoder (SigLIP + Gemma 3 projector): every precision against transformers, and the runtime.

Measured on the tiny checkpoint (2 vision layers, 64x64 -> 16 tokens x 256) against
`Gemma3ForConditionalGeneration.get_image_features` on the processor's pixel_values of `xray_png`
(worst per-token cosine / max |diff|, reference values up to 3.86):
  fp32 0.9999999999999 / 1.7e-6;  fp16 (run on CPU) 0.99999984 / 1.8e-3;
  int8 dynamic 0.99978 / 0.067;  int8 static QDQ (4 generated films + 1 CT DICOM) 0.99971 / 0.087;
  the same under `qemu-x86_64 -cpu Haswell` (no VNNI: the runtime picks ORT's exact u8 x u8 kernels),
  where ORT's u8 x s8 kernel gives 0.9954 against the native features (int16 pair sums saturate).
Asserted floors are the converter's own: fp32 0.99999, fp16 0.999, int8 0.99 (int8 keeps ~1% of
direction error as budget: a random-weight tower has no accuracy metric to spend it against).
ONNX fp32 vs llama.cpp mtmd with the f32 mmproj: cosine 0.99999997, max |diff| 7e-4 (ggml's own
kernels); asserted: cosine >= 0.99999, max |diff| < 1e-3 x max |value|.
Full-size (4B) figures and timings: benchmarks/results/vision-oneoff-*.md.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from convert.checkpoint import Checkpoint
from convert.writers.onnx_vision import METHODS, VisionExporter, build_torch_module, calibration_files, compare
from convert.registry import load_spec
from medgemma_edge.bundle import open_bundle
from medgemma_edge.backends.onnx.session import make_session
from medgemma_edge.backends.onnx.vision import OnnxEncoder
from medgemma_edge.errors import UserError
from medgemma_edge.bundle.precisions import PRECISIONS
from medgemma_edge.inputs.images import resize_square

FLOORS = {p: PRECISIONS["encoder"][f"onnx:{p}"].min_cosine for p in METHODS}  # the precision table's


def _film(path: Path, seed: int, size: tuple[int, int] = (90, 110)) -> Path:
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    lungs = sum(np.exp(-(((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2)) for cx in (0.3 + 0.02 * seed, 0.7))
    gray = np.clip(210 - 150 * lungs + rng.normal(0, 8, (h, w)), 0, 255).astype(np.uint8)
    Image.fromarray(gray, mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("calib")
    for i in range(4):
        _film(folder / f"film{i}.png", seed=i)
    (folder / "notes.txt").write_text("not an image: must be skipped")
    from pydicom.data import get_testdata_file

    (folder / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())  # rendered as the runtime does
    return folder


@pytest.fixture(scope="module")
def exported(tiny_ckpt: Path, calib_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    out = tmp_path_factory.mktemp("onnx")
    with VisionExporter(Checkpoint(tiny_ckpt), load_spec(tiny_ckpt), workdir=out, progress=False) as exporter:
        return {p: (out / f"vision-{p}.onnx", exporter.write(out / f"vision-{p}.onnx", p,
                                                             calib_dir if p == "int8_static" else None))
                for p in METHODS}


@pytest.fixture(scope="module")
def hf_features(reference, xray_png: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values [1, 3, S, S], get_image_features [1, tokens, hidden]) from transformers itself."""
    import torch

    pixels = reference.processor.image_processor(images=Image.open(xray_png), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = reference.model.get_image_features(pixels)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5 / 4.x
    return pixels.numpy(), feats.float().numpy()


def _run(path: Path, pixels: np.ndarray, exact_int8: bool | None = None) -> np.ndarray:
    """Through the runtime's session: on x86 without VNNI it turns ORT's exact int8 kernels on."""
    return make_session(path, ["CPUExecutionProvider"], exact_int8=exact_int8).run(None, {"pixel_values": pixels})[0]


@pytest.mark.parametrize("precision", list(METHODS))
def test_matches_transformers_reference(exported, hf_features, precision: str) -> None:
    path, recipe = exported[precision]
    pixels, ref = hf_features
    ours = _run(path, pixels)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    fig = compare(ref, ours)
    assert fig["cosine_min"] >= FLOORS[precision], fig
    if precision == "fp32":
        assert fig["max_abs"] < 1e-4, fig
    # the converter's own validation passed the same floor, and says so in the recipe
    assert recipe["validation"]["cosine_min"] >= FLOORS[precision] == recipe["validation"]["min_cosine"]


def test_batch_axis_is_dynamic(exported, hf_features) -> None:
    pixels, ref = hf_features
    pair = np.concatenate([pixels, -pixels])
    out = _run(exported["fp32"][0], pair)
    assert out.shape == (2, *ref.shape[1:])
    np.testing.assert_allclose(out[:1], ref, atol=1e-4)
    assert not np.allclose(out[0], out[1])


def test_recipe(exported, calib_dir: Path) -> None:
    import hashlib

    fp32 = exported["fp32"][1]
    assert fp32["method"] is None and fp32["opset"] == 17 and fp32["files"] == ["vision-fp32.onnx"]
    assert fp32["input"] == {"name": "pixel_values", "dtype": "float32", "shape": ["n", 3, 64, 64]}
    assert fp32["output"]["shape"] == ["n", 16, 256] and fp32["optimizer"]["fused"]["MultiHeadAttention"] == 2
    for precision, (path, _) in exported.items():  # the tiled attention kernel, never the one holding all scores
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        assert "MultiHeadAttention" in ops and "Attention" not in ops, precision
    assert exported["int8"][1]["method"] == "dynamic" and exported["int8"][1]["calibration"] is None
    static = exported["int8_static"][1]
    assert static["method"] == "static" and static["quantization"]["quant_format"] == "QDQ"
    files = sorted([*calib_dir.glob("*.png"), calib_dir / "ct.dcm"])
    assert static["calibration"] == {"count": 5, "sha256": [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]}
    sizes = {p: path.stat().st_size for p, (path, _) in exported.items()}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]


@pytest.mark.parametrize("precision", ["int8", "int8_static"])
def test_exact_int8_kernels_give_the_same_features(exported, hf_features, precision: str) -> None:
    """ORT's u8 x u8 kernels (what CPUs without VNNI get) against this CPU's own choice, on full 8-bit weights.

    On a VNNI CPU both are exact integer GEMMs, so they agree to float rounding; on one without VNNI the
    default is the exact mode already, and the parity above is what fails if it is not.
    """
    from onnx import numpy_helper

    path, _ = exported[precision]
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]  # not the zero points
    assert max(int(np.abs(w).max()) for w in weights) > 64  # 8-bit: 2 * 255 * |w| overflows int16 pair sums
    pixels, ref = hf_features
    exact, default = _run(path, pixels, exact_int8=True), _run(path, pixels)
    np.testing.assert_allclose(exact, default, atol=1e-4 * float(np.abs(ref).max()))
    assert compare(ref, exact)["cosine_min"] >= FLOORS[precision]


# run under qemu: every int8 graph in argv[3:], as the runtime chooses and with u8 x s8 forced
_EMULATED_CHILD = """
import sys
from pathlib import Path
import numpy as np
from medgemma_edge.backends.onnx.session import make_session
pixels = np.load(sys.argv[1])
np.save(sys.argv[2], np.stack([make_session(Path(a), ["CPUExecutionProvider"], 1, exact_int8=exact).run(
    None, {"pixel_values": pixels})[0] for a in sys.argv[3:] for exact in (None, False)]))
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86 CPU: qemu-x86_64 runs x86 Pythons only")
def test_int8_is_exact_on_an_emulated_cpu_without_vnni(exported, hf_features, tmp_path: Path) -> None:
    """`qemu-x86_64 -cpu Haswell` (AVX2, no VNNI): the runtime finds no VNNI and gives the same features as here.

    The forced u8 x s8 control must saturate there, or the emulated CPU was not one without VNNI.
    """
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 not found: `make test` installs Debian's qemu-user"
    pixels, ref = hf_features
    np.save(tmp_path / "pixels.npy", pixels)
    precisions = ("int8", "int8_static")
    paths = [str(exported[p][0]) for p in precisions]
    subprocess.run([qemu, "-cpu", "Haswell", sys.executable, "-c", _EMULATED_CHILD, str(tmp_path / "pixels.npy"),
                    str(tmp_path / "out.npy"), *paths], check=True, timeout=600, capture_output=True)
    emulated = np.load(tmp_path / "out.npy").reshape(len(paths), 2, *ref.shape)
    for precision, path, (chosen, forced) in zip(precisions, paths, emulated):
        here = _run(Path(path), pixels)
        # measured: 1 - cosine 1.4e-5 against here (an activation rounded to the next uint8 step), and the
        # same worst cosine against torch to 8 digits; the forced u8 x s8 control: 4.6e-3
        assert compare(here, chosen)["cosine_min"] > 0.99995, path
        assert compare(ref, chosen)["cosine_min"] >= FLOORS[precision], path
        assert compare(here, forced)["cosine_min"] < 0.9995, path


def test_dicom_calibration_uses_the_runtime_rendering(calib_dir: Path, tiny_ckpt: Path) -> None:
    from convert.writers.onnx_vision import calibration_pixels
    from medgemma_edge.inputs.dicom import render
    from medgemma_edge.inputs.images import pixel_values

    assert calib_dir / "ct.dcm" in calibration_files(calib_dir)
    np.testing.assert_array_equal(calibration_pixels(calib_dir / "ct.dcm", load_spec(tiny_ckpt)),
                                  pixel_values(render(calib_dir / "ct.dcm"), 64))


def test_only_vision_tensors_are_read(tiny_ckpt: Path) -> None:
    class Recording(Checkpoint):
        def get(self, name: str) -> np.ndarray:
            self.read.append(name)
            return super().get(name)

    ckpt = Recording(tiny_ckpt)
    ckpt.read = []
    build_torch_module(ckpt, load_spec(tiny_ckpt))
    assert ckpt.read and all(n.startswith(("vision.", "projector.")) for n in ckpt.read)
    assert set(ckpt.read) == set(ckpt.names("vision")) | set(ckpt.names("projector"))


def test_encoder_normalises_like_transformers(exported, hf_features, xray_png: Path) -> None:
    pixels, ref = hf_features
    enc = OnnxEncoder(exported["fp32"][0], n_embd=256, tokens_per_image=16, n_threads=1)
    out = enc.encode(resize_square(xray_png, 64))
    assert out.shape == (16, 256) and out.dtype == np.float32
    assert compare(ref[0], out)["cosine_min"] >= 0.99999
    assert enc.providers == ["CPUExecutionProvider"] and enc.threads == 1
    batch = enc.encode_batch(np.stack([resize_square(xray_png, 64)] * 2))
    np.testing.assert_allclose(batch[1], out, atol=1e-5)


def test_encoder_fp16_graph_inputs(exported, tmp_path: Path, xray_png: Path) -> None:
    """A graph converted without keep_io_types takes and returns float16: the encoder adapts."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(exported["fp32"][0])))
    model.convert_float_to_float16(use_symbolic_shape_infer=True, keep_io_types=False)
    path = tmp_path / "half-io.onnx"
    model.save_model_to_file(str(path))
    image = resize_square(xray_png, 64)
    half = OnnxEncoder(path, 256, 16).encode(image)
    full = OnnxEncoder(exported["fp32"][0], 256, 16).encode(image)
    assert half.dtype == np.float32 and compare(full, half)["cosine_min"] >= 0.999


def test_encoder_matches_mtmd(exported, tiny_bundle: Path, xray_png: Path) -> None:
    """Same weights, same pixels: ONNX fp32 and llama.cpp's mtmd with the f32 mmproj agree (max |diff| ~7e-4)."""
    from medgemma_edge.backends.llama_cpp.mtmd import MtmdEncoder

    bundle = open_bundle(tiny_bundle)
    mmproj = bundle.path(bundle.find("encoder", "gguf:f32"))
    vocab = bundle.vocab_artifact()
    image = resize_square(xray_png, 64)
    mtmd = MtmdEncoder(mmproj, bundle.path(vocab), 256, bundle.config["vision"], 16, n_threads=2)
    try:
        theirs = mtmd.encode(image)
    finally:
        mtmd.close()
    ours = OnnxEncoder(exported["fp32"][0], 256, 16).encode(image)
    fig = compare(theirs, ours)
    assert fig["cosine_min"] >= 0.99999 and fig["max_abs"] < 1e-3 * max(1.0, fig["ref_max_abs"]), fig


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_onnx_is_a_user_error(exported, tmp_path: Path, damage: str) -> None:
    data = exported["fp32"][0].read_bytes()
    bad = tmp_path / "vision.onnx"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x08\x07not a model" * 100, "empty": b""}[damage])
    with pytest.raises(UserError) as err:
        OnnxEncoder(bad, 256, 16)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_encoder_from_another_model_is_refused(exported) -> None:
    path = exported["fp32"][0]
    with pytest.raises(UserError, match="width 256 but the decoder's hidden size is 2560"):
        OnnxEncoder(path, n_embd=2560, tokens_per_image=16)
    with pytest.raises(UserError, match="16 tokens per image but the model expects 256"):
        OnnxEncoder(path, n_embd=256, tokens_per_image=256)
    with pytest.raises(UserError, match="not found"):
        OnnxEncoder(path.with_name("missing.onnx"), 256, 16)
    with pytest.raises(UserError, match=r"\[n, 64, 64, 3\]"):
        OnnxEncoder(path, 256, 16).encode(np.zeros((32, 32, 3), np.uint8))


def test_bad_requests_are_user_errors(tiny_ckpt: Path, tmp_path: Path, calib_dir: Path) -> None:
    from convert.writers.onnx_vision import write_onnx_vision

    ckpt, spec = Checkpoint(tiny_ckpt), load_spec(tiny_ckpt)
    with pytest.raises(UserError, match="not supported"):
        write_onnx_vision(ckpt, spec, tmp_path / "v.onnx", "int4", progress=False)
    with pytest.raises(UserError, match="needs calibration images"):
        write_onnx_vision(ckpt, spec, tmp_path / "v.onnx", "int8_static", progress=False)
    with pytest.raises(UserError, match="no PNG/JPEG"):
        calibration_files(tmp_path)
    with pytest.raises(UserError, match="must be a folder"):
        calibration_files(calib_dir / "film0.png")
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".onnx-vision-*"))
