"""SigLIP vision tower + Gemma 3 projector -> an OpenVINO IR: `ov:bf16`, or `ov:int8` (NNCF int8 weights).

`pixel_values [n, 3, S, S] float32 -> image_features [n, tokens_per_image, text_hidden] float32`.
The torch module is the ONNX writer's (transformers SigLIP + Gemma3MultiModalProjector, checkpoint
weights); OpenVINO's PyTorch frontend converts it (each layer's attention becomes one
ScaledDotProductAttention, which the CPU plugin runs as a fused MHA kernel). Weights are stored fp16; the
plugin widens them to the recorded inference precision. Every artifact is compiled as the runtime compiles
it (backends/openvino/vision.py) and run against the torch module right after it is written, and refused
(UserError) below its precision's cosine floor.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from convert.checkpoint import Checkpoint
from convert.fidelity.metrics import compare
from convert.models.gemma3 import MedGemmaSpec
from convert.writers.onnx_vision import INPUT, OUTPUT, build_torch_module, validation_pixels
from medgemma_edge.backends.openvino.vision import import_openvino, weights_path
from medgemma_edge.bundle.precisions import PRECISIONS
from medgemma_edge.errors import UserError

log = logging.getLogger(__name__)

# precision -> (how it is made, the inference precision recorded for the rest). int8: NNCF's weight-only int8
# (per output channel); the CPU plugin quantizes activations on the fly (128-wide groups). The rest runs bf16 where
# that pays (AMX; AMD's AVX512_BF16: 0.30x mtmd F16 against 0.42x for f32 on the 4-layer screen) and f32 elsewhere
# (an Intel AVX512_BF16 CPU without AMX ran bf16 slower): the runtime decides per CPU (hint_for_this_cpu). NNCF's
# calibrated static int8 missed the 0.999 floor (0.73-0.98 on the tiny tower). See benchmarks/README.md, issue 14.
METHODS: dict[str, tuple[str | None, str]] = {"bf16": (None, "bf16"), "int8": ("nncf_weights", "bf16")}
OV_VISION_PRECISIONS: tuple[str, ...] = tuple(METHODS)


def min_cosine(precision: str) -> float:
    floor = PRECISIONS["encoder"][f"ov:{precision}"].min_cosine
    assert floor is not None, precision
    return floor


def check_request(precision: str) -> None:
    """Refuse unknown precisions, and a missing OpenVINO or NNCF, before minutes of conversion."""
    if precision not in METHODS:
        raise UserError(f"OpenVINO vision precision {precision!r} is not supported; choose from {', '.join(METHODS)}")
    import_openvino(f"--ov-vision {precision}")
    if METHODS[precision][0] == "nncf_weights" and importlib.util.find_spec("nncf") is None:
        raise UserError(f"--ov-vision {precision}: NNCF is not installed; pip install 'medgemma-edge[openvino]'")


def to_openvino(module: Any, image_size: int) -> Any:
    """OpenVINO's PyTorch frontend over the torch module; dynamic batch, named input and output."""
    import torch

    ov = import_openvino("--ov-vision")
    example = torch.zeros(1, 3, image_size, image_size, dtype=torch.float32)
    with torch.no_grad():
        model = ov.convert_model(module, example_input=example, input=[(-1, 3, image_size, image_size)])
    model.inputs[0].get_tensor().set_names({INPUT})
    model.outputs[0].get_tensor().set_names({OUTPUT})
    return model


def quantize_int8(model: Any) -> tuple[Any, dict[str, Any]]:
    """NNCF weight compression: every MatMul's (and the patch convolution's) weights to int8, no calibration.

    ref: NNCF docs, "Weight Compression" (INT8_ASYM: per output channel, asymmetric). The CPU plugin's dynamic
    quantization (DYNAMIC_QUANTIZATION_GROUP_SIZE: 128 here, 32 by default) then runs those MatMuls as int8 GEMMs.
    """
    import nncf

    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    return compressed, {"tool": "nncf", "nncf": _version("nncf"), "method": "compress_weights", "mode": "int8_asym",
                        "weights": "int8 per output channel, asymmetric",
                        "activations": "int8 at run time (CPU plugin dynamic quantization, groups of 128)"}


def _version(package: str) -> str | None:
    from medgemma_edge.versions import package_version

    return package_version(package)


def run_ir(xml: Path, pixels: np.ndarray, spec: MedGemmaSpec, precision_hint: str) -> tuple[np.ndarray, str]:
    """(outputs, the precision that ran): the IR through the runtime's own encoder with the recorded hint, not
    this CPU's choice (`load` may compile f32 instead: the stricter bf16 is what is validated)."""
    from medgemma_edge.backends.openvino.vision import OpenVinoEncoder

    encoder = OpenVinoEncoder(xml, spec.text.hidden_size, spec.tokens_per_image, precision_hint=precision_hint,
                              fit_to_cpu=False)
    try:
        return encoder.encode_pixels(pixels), encoder.precision
    finally:
        encoder.close()


class OvVisionExporter:
    """Builds the torch module, its reference outputs and its OpenVINO model once; writes any precision."""

    def __init__(self, ckpt: Checkpoint, spec: MedGemmaSpec, progress: bool = True) -> None:
        import torch

        self.spec, self._level = spec, logging.INFO if progress else logging.DEBUG
        v = spec.vision
        log.log(self._level, "vision OpenVINO: building SigLIP + projector from %s", ckpt.dir)
        module = build_torch_module(ckpt, spec)
        self.pixels = validation_pixels(v.image_size, mean=v.image_mean, std=v.image_std)
        with torch.no_grad():  # reference outputs, one image at a time (bounded memory at 896x896)
            self.reference = np.concatenate([module(torch.from_numpy(p[None])).numpy() for p in self.pixels])
        log.log(self._level, "vision OpenVINO: converting with OpenVINO's PyTorch frontend")
        self.model = to_openvino(module, v.image_size)
        del module

    def write(self, out: Path, precision: str) -> dict[str, Any]:
        """Write `out` (the .xml; weights in `<out>.bin`), validated; return its manifest recipe."""
        ov = import_openvino(out)
        check_request(precision)
        method, hint = METHODS[precision]
        floor, quant, model = min_cosine(precision), None, self.model
        if method == "nncf_weights":
            log.log(self._level, "vision OpenVINO: NNCF int8 weight compression")
            model, quant = quantize_int8(self.model.clone())
        staged = out.with_name("staged-" + out.name)
        # float weights go to disk as fp16 (half the bytes); the plugin widens them to its inference precision
        ov.save_model(model, str(staged), compress_to_fp16=True)
        staged.with_suffix(".bin").replace(weights_path(out))
        staged.replace(out)
        written = [out, weights_path(out)]
        ours, ran = run_ir(out, self.pixels, self.spec, hint)
        figures = compare(self.reference, ours)
        log.log(self._level, "vision OpenVINO %s vs torch: cosine min %.6f, max |diff| %.3g", precision,
                figures["cosine_min"], figures["max_abs"])
        if figures["cosine_min"] < floor:
            for path in written:
                path.unlink()
            raise UserError(f"{out}: OpenVINO vision {precision} drifts from the torch model (worst token cosine "
                            f"{figures['cosine_min']:.6f} < {floor}); use another encoder (onnx:fp32, onnx:int8), "
                            f"or report this checkpoint")
        v, t = self.spec.vision, self.spec.tokens_per_image
        return {
            "precision": precision, "method": method, "inference_precision": hint, "files": [p.name for p in written],
            "openvino": _version("openvino"), "weights_on_disk": "int8, fp16 scales" if quant else "fp16",
            "input": {"name": INPUT, "dtype": "float32", "shape": ["n", 3, v.image_size, v.image_size]},
            "output": {"name": OUTPUT, "dtype": "float32", "shape": ["n", t, self.spec.text.hidden_size]},
            "quantization": quant,
            "validation": {**figures, "min_cosine": floor, "images": len(self.pixels),
                           "ran": ran,
                           "against": "torch fp32 (transformers SigLIP + Gemma3MultiModalProjector)"},
        }
