"""SigLIP vision tower + Gemma 3 projector -> one ONNX graph (fp32, fp16, int8 dynamic, int8 static QDQ).

`pixel_values [n, 3, S, S] float32 -> image_features [n, tokens_per_image, text_hidden] float32`,
dynamic n. Only `vision.*` / `projector.*` tensors are read: the 4B language model is never loaded.
Every artifact is run against the torch module on the same pixels right after it is written, and
refused (UserError) below its precision's cosine floor.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from convert.checkpoint import Checkpoint
from convert.fidelity.metrics import compare
from convert.models.gemma3 import MedGemmaSpec
from convert.writers.onnx_fusion import OPTIMIZER, optimize
from medgemma_edge.backends.onnx.session import make_session
from medgemma_edge.bundle.precisions import PRECISIONS
from medgemma_edge.errors import UserError
from medgemma_edge.inputs.images import normalise, pixel_values

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a standard op from 17 on; every ORT >= 1.14 runs it
INPUT, OUTPUT = "pixel_values", "image_features"
PROTOBUF_LIMIT = 2_000_000_000  # a single .onnx protobuf cannot exceed 2 GiB; above it, external data
# How each precision is made: None (a graph transform), "dynamic" or "static" int8 quantization.
METHODS: dict[str, str | None] = {"fp32": None, "fp16": None, "int8": "dynamic", "int8_static": "static"}
ONNX_VISION_PRECISIONS: tuple[str, ...] = tuple(METHODS)


def min_cosine(precision: str) -> float:
    """Worst per-token cosine against the fp32 torch module: the precision table's floor."""
    floor = PRECISIONS["encoder"][f"onnx:{precision}"].min_cosine
    assert floor is not None, precision
    return floor


# -- the torch module --------------------------------------------------------------------------
def build_torch_module(ckpt: Checkpoint, spec: MedGemmaSpec) -> Any:
    """SiglipVisionModel + Gemma3MultiModalProjector with the checkpoint's weights, fp32, eval mode."""
    import torch
    from transformers import AutoConfig, SiglipVisionModel
    from transformers.initialization import no_init_weights
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    cfg = AutoConfig.from_pretrained(ckpt.dir)
    cfg.vision_config._attn_implementation = "eager"  # the reference's attention; plain ops export cleanly
    with no_init_weights():  # weights come from the checkpoint; skip 400M random inits
        vision, projector = SiglipVisionModel(cfg.vision_config), Gemma3MultiModalProjector(cfg)

    class VisionProjector(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision, self.projector = vision, projector

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [n, 3, S, S] -> [n, tokens, hidden]
            # ref: transformers Gemma3Model.get_image_features
            return self.projector(self.vision(pixel_values=pixels).last_hidden_state)

    module = VisionProjector()
    for part, namespace in ((vision, "vision"), (projector, "projector")):
        state = {}
        for key, ref in part.state_dict().items():  # transformers 4.x nests SigLIP under `vision_model.`
            arr = ckpt.get(f"{namespace}.{key.removeprefix('vision_model.')}")  # UserError when missing
            if tuple(arr.shape) != tuple(ref.shape):
                raise UserError(f"{ckpt.dir}: {namespace}.{key} has shape {arr.shape}, config implies {tuple(ref.shape)}")
            state[key] = torch.from_numpy(arr)
        part.load_state_dict(state, strict=True, assign=True)
    module.image_size = spec.vision.image_size
    return module.float().eval()


def export_fp32(module: Any, path: Path) -> None:
    """TorchScript export (onnxscript/dynamo is not required), batch axis dynamic; weights in path.data."""
    import onnx
    import torch

    traced = path.with_name("traced-" + path.name)
    dummy = torch.zeros(1, 3, module.image_size, module.image_size, dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, chosen on purpose
        torch.onnx.export(module, (dummy,), str(traced), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT], do_constant_folding=True,
                          dynamic_axes={INPUT: {0: "n"}, OUTPUT: {0: "n"}})
    _save(onnx.load(str(traced)), path, external=True)
    traced.unlink()


# -- post-processing steps: file -> file. Intermediates keep weight matrices in external data, so
# graph-only passes (shape inference) never load 1.7 GB and the heavy ones load it once.
WEIGHTS_OUT = 1 << 20  # tensors above 1 MB go to external data; biases and shape constants stay inline


def _save(model: Any, path: Path, external: bool = False) -> None:
    import onnx

    external = external or model.ByteSize() > PROTOBUF_LIMIT  # the final 4B fp32 (1.68 GB) stays one file
    onnx.save_model(model, str(path), save_as_external_data=external, size_threshold=WEIGHTS_OUT,
                    location=path.name + ".data" if external else None)


def finish_graph(src: Path, dst: Path, spec: MedGemmaSpec, precision: str) -> None:
    """Pin the output shape (the tracer leaves tokens symbolic), record what the graph is, save to dst."""
    import onnx

    model = onnx.load(str(src))
    for dim, value in zip(model.graph.output[0].type.tensor_type.shape.dim[1:], (spec.tokens_per_image,
                                                                               spec.text.hidden_size)):
        dim.dim_value = value  # replaces the symbolic name (a oneof)
    meta = {"kind": "vision+projector", "precision": precision, "image_size": spec.vision.image_size,
            "tokens_per_image": spec.tokens_per_image}
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=f"medgemma_edge.{key}", value=str(value))
    _save(model, dst)


def typed_copy(src: Path) -> Path:
    """ORT symbolic shape inference: types the outputs of fused ops, so converters see every tensor.

    ref: onnxruntime quantization docs, "pre-processing"; without it a static QDQ pass silently leaves
    every activation behind a fused op unquantized. Runs on the graph alone (the result shares src's
    external data): quant_pre_process on the whole 4B model peaks at ~8 GB, this at 0.3 GB.
    """
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    dst = src.with_name("typed-" + src.name)  # beside src: the external-data location is relative
    graph = SymbolicShapeInference.infer_shapes(onnx.load(str(src), load_external_data=False), auto_merge=True)
    # the mark ORT's quantizers look for; without it they log a "consider pre-processing" nag at the user.
    # The optimisation half of quant_pre_process is done already (onnx_fusion)
    graph.metadata_props.add(key="onnx.quant.pre_process", value="onnxruntime.quant")
    onnx.save_model(graph, str(dst))
    return dst


def to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: callers feed float32 pixels and get float32 features, on any provider
    _save(convert_float_to_float16(onnx.load(str(typed_copy(src))), keep_io_types=True, disable_shape_infer=True), dst)


def quantize_int8_dynamic(src: Path, dst: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ref: ORT docs: dynamic quantization is the recommended int8 path for transformers on CPU;
    # weight MatMuls (Q/K/V projections included) become MatMulInteger; attention itself stays fp32.
    # Full 8-bit weights: 7-bit ones (reduce_range) left the 4B encoder at worst-token cosine 0.9984, under
    # issue 14's 0.999. On x86 CPUs without VNNI the runtime picks exact u8 x u8 kernels (make_session).
    ops = ["MatMul"]
    quantize_dynamic(typed_copy(src), dst, op_types_to_quantize=ops, per_channel=True,
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    return {"op_types": ops, "per_channel": True, "weight_type": "int8",
            "activation_type": "uint8 (per tensor, runtime)"}


def quantize_int8_static(src: Path, dst: Path, images: list[Path], spec: MedGemmaSpec) -> dict[str, Any]:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    class One(CalibrationDataReader):
        def __init__(self, path: Path | None) -> None:
            self.path = path

        def get_next(self) -> dict[str, np.ndarray] | None:
            path, self.path = self.path, None
            return None if path is None else {INPUT: calibration_pixels(path, spec)[None]}

    typed, ranges = typed_copy(src), dst.with_name("ranges-" + dst.stem + ".json")
    calibrator = create_calibrator(typed, ["MatMul"], augmented_model_path=str(dst.with_name("aug-" + dst.name)),
                                   calibrate_method=CalibrationMethod.MinMax)
    # ORT's calibration session runs in its DEFAULT order, which schedules the added ReduceMin/Max
    # nodes last and so keeps every calibrated activation alive (13 GB for one 4B image); graph order
    # (PRIORITY_BASED) frees each after its reduction: 4.8 GB. ref: onnxruntime calibrate.py
    # create_inference_session (same DISABLE_ALL level as there).
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    calibrator.infer_session = None
    calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, opts,
                                                    providers=["CPUExecutionProvider"])
    for path in images:  # each call reduces and merges ranges: memory stays one image's worth
        calibrator.collect_data(One(path))
    save_tensors_data(calibrator.compute_data(), ranges)
    del calibrator
    # S8S8 QDQ: ORT's recommended first choice on x86. MatMulConstBOnly: weight MatMuls only
    # (attention itself stays fp32, inside MultiHeadAttention). Full 8-bit weights, as in the dynamic path.
    quantize_static(typed, dst, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    calibration_cache_path=ranges, extra_options={"MatMulConstBOnly": True})
    return {"op_types": ["MatMul"], "quant_format": "QDQ", "per_channel": True, "weight_type": "int8",
            "activation_type": "int8", "calibrate_method": "MinMax"}


# -- calibration images ------------------------------------------------------------------------
def calibration_files(folder: Path) -> list[Path]:
    """PNG/JPEG/TIFF and DICOM files in `folder`, sorted by name."""
    from medgemma_edge.inputs.files import image_files

    if not folder.is_dir():
        raise UserError(f"{folder}: calibration images must be a folder of PNG/JPEG/DICOM files; pass a folder")
    files = image_files(folder)
    if not files:
        raise UserError(f"{folder}: no PNG/JPEG/DICOM calibration images found; "
                        f"add a few representative images (10-50 is typical)")
    return files


def calibration_pixels(path: Path, spec: MedGemmaSpec) -> np.ndarray:
    """What the runtime feeds the encoder for this file (DICOM rendered, EXIF applied, stretched, normalised)."""
    v = spec.vision
    return pixel_values(path, v.image_size, v.image_mean, v.image_std)


# -- validation --------------------------------------------------------------------------------
def validation_pixels(size: int, seed: int = 0, mean: Any = 0.5, std: Any = 0.5) -> np.ndarray:
    """Two uniform-noise images and one smooth film-like image, normalised: [3, 3, S, S] float32."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / size
    lungs = sum(np.exp(-((xx - cx) ** 2 + (yy - 0.5) ** 2) / 0.02) for cx in (0.33, 0.67))
    film = np.clip(220 - 160 * lungs + 25 * np.sin(40 * yy), 0, 255).astype(np.uint8)
    images = np.concatenate([noise, np.repeat(film[None, :, :, None], 3, axis=-1)])
    return normalise(images, mean, std)  # as the runtime does


def run_onnx(path: Path, pixels: np.ndarray) -> np.ndarray:
    session = make_session(path, ["CPUExecutionProvider"])  # the runtime's: exact int8 kernels on every CPU
    return np.concatenate([session.run(None, {INPUT: pixels[i:i + 1]})[0] for i in range(len(pixels))])


# -- the exporter ------------------------------------------------------------------------------
def check_request(precision: str, calibration_images: Path | None) -> str | None:
    """The precision's method, refusing unknown precisions and int8_static without calibration images."""
    if precision not in METHODS:
        raise UserError(f"ONNX vision precision {precision!r} is not supported; choose from {', '.join(METHODS)}")
    method = METHODS[precision]
    if method == "static" and calibration_images is None:
        raise UserError(f"ONNX vision {precision}: static quantization needs calibration images; pass a folder "
                        f"of 10-50 representative PNG/JPEG/DICOM images, or choose int8 (dynamic)")
    if calibration_images is not None and method != "static":
        log.info("vision ONNX %s: calibration images are used by int8_static only", precision)
    return method


class VisionExporter:
    """Builds the torch module, its fp32 export and reference outputs once; writes any precision from them."""

    def __init__(self, ckpt: Checkpoint, spec: MedGemmaSpec, workdir: Path | None = None, progress: bool = True,
                 fuse: bool = True) -> None:
        import torch

        self.ckpt, self.spec, self._level = ckpt, spec, logging.INFO if progress else logging.DEBUG
        self._tmp = tempfile.TemporaryDirectory(prefix=".onnx-vision-", dir=workdir)
        self.dir, self.export_path = Path(self._tmp.name), Path(self._tmp.name) / "export.onnx"
        self.fused: dict[str, int] | None = None  # fused-op counts, when fused
        try:
            log.log(self._level, "vision ONNX: building SigLIP + projector from %s", ckpt.dir)
            module = build_torch_module(ckpt, spec)
            v = spec.vision
            self.pixels = validation_pixels(v.image_size, mean=v.image_mean, std=v.image_std)
            with torch.no_grad():  # reference outputs, one image at a time (bounded memory at 896x896)
                self.reference = np.concatenate([module(torch.from_numpy(p[None])).numpy() for p in self.pixels])
            log.log(self._level, "vision ONNX: exporting fp32 (opset %d)", OPSET)
            export_fp32(module, self.export_path)
            del module  # the graph holds its own copy of the weights
            if fuse:
                log.log(self._level, "vision ONNX: fusing with the ORT transformers optimizer (%s)", OPTIMIZER)
                self.fused = optimize(self.export_path, self.dir / "fused.onnx", spec, WEIGHTS_OUT)
        except BaseException:
            self._tmp.cleanup()
            raise

    def write(self, out: Path, precision: str, calibration_images: Path | None = None,
              fused: bool = True) -> dict[str, Any]:
        """Write one precision to `out` (validated) and return its manifest recipe.

        fused=False writes from the plain export even when a fused graph exists (for comparisons).
        """
        method, floor = check_request(precision, calibration_images), min_cosine(precision)
        fused = fused and self.fused is not None
        src = self.dir / "fused.onnx" if fused else self.export_path
        tmp, quant, calib = self.dir / f"out-{precision}.onnx", None, None
        log.log(self._level, "vision ONNX: writing %s", precision)
        if precision == "fp32":
            tmp = src
        elif precision == "fp16":
            to_fp16(src, tmp)
        elif precision == "int8":
            quant = quantize_int8_dynamic(src, tmp)
        else:
            files = calibration_files(calibration_images)  # type: ignore[arg-type]
            quant = quantize_int8_static(src, tmp, files, self.spec)
            calib = {"count": len(files), "sha256": [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]}
        finish_graph(tmp, out, self.spec, precision)  # the only write to `out`
        for leftover in self.dir.iterdir():  # free the disk: 4B intermediates are 0.5-1.7 GB each
            if not leftover.name.startswith(("export.onnx", "fused.onnx")):
                leftover.unlink()
        written = [out] + [p for p in [out.with_name(out.name + ".data")] if p.exists()]
        figures = compare(self.reference, run_onnx(out, self.pixels))
        log.log(self._level, "vision ONNX %s vs torch: cosine min %.6f, max |diff| %.3g", precision,
                figures["cosine_min"], figures["max_abs"])
        if figures["cosine_min"] < floor:
            for path in written:
                path.unlink()
            raise UserError(f"{out}: ONNX vision {precision} drifts from the torch model (worst token cosine "
                            f"{figures['cosine_min']:.6f} < {floor}); use fp32 or report this checkpoint")
        v, t = self.spec.vision, self.spec.tokens_per_image
        return {
            "precision": precision, "method": method, "opset": OPSET, "files": [p.name for p in written],
            "input": {"name": INPUT, "dtype": "float32", "shape": ["n", 3, v.image_size, v.image_size]},
            "output": {"name": OUTPUT, "dtype": "float32", "shape": ["n", t, self.spec.text.hidden_size]},
            "optimizer": {**OPTIMIZER, "fused": self.fused} if fused else None,
            "quantization": quant, "calibration": calib,
            "validation": {**figures, "min_cosine": floor, "images": len(self.pixels),
                           "against": "torch fp32 (transformers SigLIP + Gemma3MultiModalProjector)"},
        }

    def __enter__(self) -> "VisionExporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def write_onnx_vision(ckpt: Checkpoint, spec: MedGemmaSpec, out: Path, precision: str,
                      calibration_images: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """One precision in one call; to write several, use one VisionExporter (export once, reuse it)."""
    check_request(precision, calibration_images)  # before minutes of export
    with VisionExporter(ckpt, spec, workdir=out.parent, progress=progress) as exporter:
        return exporter.write(out, precision, calibration_images)
