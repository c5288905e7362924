"""The OpenVINO image encoder: SigLIP + Gemma 3 projector as an OpenVINO IR (`convert/writers/ov_vision.py`).

Runtime only: openvino + numpy, no torch or transformers. OpenVINO is an optional extra
(`pip install 'medgemma-edge[openvino]'`); without it an `ov:*` encoder is refused in one line.
Pixels are normalised here exactly as for the ONNX encoder (inputs.images.normalise, the manifest's
mean and std), so the graph sees what transformers' processor produces.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_edge.backends.cpu import bf16_pays, this_cpu
from medgemma_edge.errors import UserError
from medgemma_edge.inputs.images import normalise

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'medgemma-edge[openvino]'"
# Inference precisions a recipe may record. OpenVINO's CPU plugin runs "bf16" on AVX512_BF16/AMX CPUs
# and f32 elsewhere; the compiled model reports which it chose.
HINTS = ("f32", "bf16")


def hint_for_this_cpu(recorded: str) -> str:
    """The recorded hint, except bf16 becomes f32 where bf16 runs slower than f32 (backends.cpu.bf16_pays):
    Intel's AVX512_BF16 without AMX, where the plugin would take bf16 and lose time (issue 14's screens)."""
    if recorded != "bf16":
        return recorded
    vendor, flags = this_cpu()
    return "bf16" if bf16_pays(vendor, flags) else "f32"


def import_openvino(what: object) -> Any:
    """The openvino module, or a one-line UserError naming the install command. OpenVINO's telemetry is
    declined first (decline_telemetry)."""
    decline_telemetry()
    try:
        import openvino
    except ImportError as exc:
        raise UserError(f"{what}: the ov:* encoders need OpenVINO, which is not installed; {INSTALL_HINT}, "
                        f"or choose another encoder (e.g. --encoder onnx:int8)") from exc
    return openvino


def decline_telemetry() -> None:
    """Answer "declined" to every OpenVINO telemetry consent check in this process. Its conversion API and NNCF
    send usage data to Google Analytics unless a consent file says no, and count a missing file as yes
    (openvino-telemetry's OptInChecker with enable_opt_in_dialog=False). This project never phones home, and the
    user's own consent file is left as it is."""
    try:
        from openvino_telemetry.utils import opt_in_checker
    except ImportError:  # no telemetry package, nothing to decline
        return
    declined = opt_in_checker.ConsentCheckResult.DECLINED
    opt_in_checker.OptInChecker.check = lambda self, *args, **kwargs: declined


def require_openvino(what: object) -> None:
    """Refuse early (before a decoder loads for minutes) when OpenVINO cannot be imported."""
    import_openvino(what)


def weights_path(xml: Path) -> Path:
    """The IR's weights: `<name>.xml.bin`, so the bundle counts them with the graph (its `<file>.*` rule)."""
    return xml.with_name(xml.name + ".bin")


def compile_config(precision_hint: str, n_threads: int | None) -> dict[str, Any]:
    """CPU plugin properties: one stream in latency mode, the recorded inference precision, and ov:int8's
    activations quantized in groups of 128 (the plugin's default, 32, took 1.06-1.08x the time at 4B on an AMD
    EPYC, cosine within 2e-5; benchmarks/README.md, issue 14). Without int8 weights the group size is unused."""
    if precision_hint not in HINTS:
        raise UserError(f"OpenVINO inference precision {precision_hint!r} is not one of {', '.join(HINTS)}; "
                        f"re-run `medgemma-edge convert`")
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                              "INFERENCE_PRECISION_HINT": precision_hint, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 128}
    if n_threads:
        config["INFERENCE_NUM_THREADS"] = int(n_threads)
    return config


class OpenVinoEncoder:
    """Encodes square RGB uint8 images [S, S, 3] into image-token embeddings [tokens, hidden] float32."""

    def __init__(self, path: Path, n_embd: int, tokens_per_image: int, n_threads: int | None = None,
                 mean: Sequence[float] = (0.5,) * 3, std: Sequence[float] = (0.5,) * 3,
                 precision_hint: str = "bf16", extra_config: dict[str, Any] | None = None,
                 fit_to_cpu: bool = True) -> None:
        """`fit_to_cpu`: compile with hint_for_this_cpu(precision_hint), not the hint as recorded (the converter
        validates the recorded one); `extra_config`: CPU plugin properties on top of compile_config's."""
        self.path = Path(path)
        ov = import_openvino(self.path)
        self.mean, self.std = tuple(mean), tuple(std)
        self.n_embd, self.tokens_per_image, self.threads = n_embd, tokens_per_image, n_threads
        wanted = hint_for_this_cpu(precision_hint) if fit_to_cpu else precision_hint
        if wanted != precision_hint:
            log.info("OpenVINO encoder: %s recorded, compiling %s: bf16 runs slower than f32 on this CPU "
                     "(no AMX, not AMD's AVX512_BF16)", precision_hint, wanted)
        config = {**compile_config(wanted, n_threads), **(extra_config or {})}
        for p in (self.path, weights_path(self.path)):
            if not p.is_file():
                raise UserError(f"{p}: OpenVINO IR file not found; re-run `medgemma-edge convert`")
        try:
            core = ov.Core()
            model = core.read_model(str(self.path), str(weights_path(self.path)))
            self._check_io(model)
            # batch 1, static: the CPU plugin plans every buffer once; a batch is encoded image by image
            model.reshape([1, 3, self.image_size, self.image_size])
            self._compiled = core.compile_model(model, "CPU", config)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses for a bad IR
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{self.path}: OpenVINO cannot load this encoder ({first}); "
                            f"re-run `medgemma-edge convert`") from exc
        del model  # the compiled model holds its own (repacked) weights
        self._request = self._compiled.create_infer_request()
        ran = self._compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino Type
        self.precision = str(ran.get_type_name() if hasattr(ran, "get_type_name") else ran)
        self.providers: list[str] = [f"OpenVINO:CPU:{self.precision}"]  # what runs, after any bf16 fallback
        if self.precision != wanted:
            log.info("OpenVINO encoder: %s inference unavailable on this CPU, running %s", wanted, self.precision)

    def _check_io(self, model: Any) -> None:
        shape = model.inputs[0].get_partial_shape() if len(model.inputs) == 1 else None
        out = model.outputs[0].get_partial_shape() if len(model.outputs) == 1 else None
        if shape is None or out is None or shape.rank.get_length() != 4 or out.rank.get_length() != 3:
            raise UserError(f"{self.path}: not a vision encoder graph (expected pixel_values [n, 3, S, S] -> "
                            f"[n, tokens, hidden]); pass the encoder from a medgemma-edge bundle")
        if not (shape[2].is_static and shape[3].is_static) or shape[2] != shape[3]:
            raise UserError(f"{self.path}: encoder input is {shape}; expected float pixels of a fixed square size: "
                            f"re-run `medgemma-edge convert`")
        self.image_size = shape[2].get_length()
        tokens, width = out[1], out[2]
        self._check(tokens.get_length() if tokens.is_static else None, width.get_length() if width.is_static else None)

    def _check(self, tokens: int | None, width: int | None) -> None:
        if width is not None and width != self.n_embd:
            raise UserError(f"{self.path}: encoder projects to width {width} but the decoder's hidden size is "
                            f"{self.n_embd}: this encoder belongs to another model")
        if tokens is not None and tokens != self.tokens_per_image:
            raise UserError(f"{self.path}: encoder yields {tokens} tokens per image but the model expects "
                            f"{self.tokens_per_image}: this encoder belongs to another model")

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Normalised pixels [n, 3, S, S] float32 -> embeddings [n, tokens, n_embd] float32, written in place."""
        import openvino as ov

        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        out = np.empty((len(pixels), self.tokens_per_image, self.n_embd), np.float32)
        for i in range(len(pixels)):
            # the plugin reads our pixels and writes straight into `out`: no copy either way
            self._request.set_input_tensor(ov.Tensor(pixels[i:i + 1], shared_memory=True))
            self._request.set_output_tensor(ov.Tensor(out[i:i + 1], shared_memory=True))
            self._request.infer()
        return out

    def encode_batch(self, images: np.ndarray) -> np.ndarray:
        """images: [n, S, S, 3] uint8 -> embeddings [n, tokens, n_embd] float32."""
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise UserError(f"{self.path.name}: images must be [n, {s}, {s}, 3] uint8 (got {list(images.shape)}); "
                            f"resize with medgemma_edge.inputs.images.resize_square first")
        return self.encode_pixels(normalise(images, self.mean, self.std))

    def encode(self, image: np.ndarray) -> np.ndarray:
        """image: [S, S, 3] uint8 -> embeddings [tokens, n_embd] float32."""
        return self.encode_batch(np.asarray(image)[None])[0]

    def close(self) -> None:
        self._request = self._compiled = None  # type: ignore[assignment]
