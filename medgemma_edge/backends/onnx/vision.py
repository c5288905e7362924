"""The ONNX Runtime image encoder: SigLIP + Gemma 3 projector graph from `convert/writers/onnx_vision.py`.

Runtime only: onnxruntime + numpy, no torch or transformers. Pixels are normalised here exactly as
transformers' Gemma3ImageProcessor does (inputs.images.normalise, with the checkpoint's mean and std),
so the graph sees what the reference sees.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medgemma_edge.backends.onnx.session import default_providers, make_session
from medgemma_edge.errors import UserError
from medgemma_edge.inputs.images import normalise

log = logging.getLogger(__name__)

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxEncoder:
    """Encodes square RGB uint8 images [S, S, 3] into image-token embeddings [tokens, hidden] float32."""

    def __init__(self, path: Path, n_embd: int, tokens_per_image: int, providers: list[str] | None = None,
                 n_threads: int | None = None, mean: Sequence[float] = (0.5,) * 3,
                 std: Sequence[float] = (0.5,) * 3) -> None:
        self.path = Path(path)
        self.mean, self.std = tuple(mean), tuple(std)
        asked = list(providers) if providers else default_providers()
        # EXTENDED, not ALL: on the 4B tower, 2 CPU threads, ALL cost 1 GB of peak RSS for nothing
        # (benchmarks/results/*/vision-tuning.md); not BASIC, which leaves an int8_static graph's QDQ
        # pairs unfused (15.9 s vs 11.2 s). No spin-waiting: the encoder's idle threads must not take
        # cores from the llama.cpp decode that follows.
        self._session = make_session(self.path, asked, n_threads, level="EXTENDED", spin=False)
        self.providers: list[str] = self._session.get_providers()  # what runs, after any CUDA fallback
        self.threads: int | None = n_threads  # None: ORT's default, one intra-op thread per physical core
        if asked[0] not in self.providers:
            log.warning("ONNX encoder: %s unavailable, running on %s", asked[0], self.providers[0])
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs[0].shape) != 3:
            raise UserError(f"{self.path}: not a vision encoder graph (expected pixel_values [n, 3, S, S] -> "
                            f"[n, tokens, hidden]); pass the encoder from a medgemma-edge bundle")
        self._input = inputs[0].name
        self._dtype = _DTYPES.get(inputs[0].type)
        size = inputs[0].shape[2]
        if self._dtype is None or not isinstance(size, int):
            raise UserError(f"{self.path}: encoder input is {inputs[0].type} {inputs[0].shape}; expected float "
                            f"pixels of a fixed square size: re-run `medgemma-edge convert`")
        self.image_size = size
        self.n_embd, self.tokens_per_image = n_embd, tokens_per_image
        tokens, width = outputs[0].shape[1:]
        self._check(tokens, width)

    def _check(self, tokens: object, width: object) -> None:
        if isinstance(width, int) and width != self.n_embd:
            raise UserError(f"{self.path}: encoder projects to width {width} but the decoder's hidden size is "
                            f"{self.n_embd}: this encoder belongs to another model")
        if isinstance(tokens, int) and tokens != self.tokens_per_image:
            raise UserError(f"{self.path}: encoder yields {tokens} tokens per image but the model expects "
                            f"{self.tokens_per_image}: this encoder belongs to another model")

    def encode_batch(self, images: np.ndarray) -> np.ndarray:
        """images: [n, S, S, 3] uint8 -> embeddings [n, tokens, n_embd] float32."""
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise UserError(f"{self.path.name}: images must be [n, {s}, {s}, 3] uint8 (got {list(images.shape)}); "
                            f"resize with medgemma_edge.inputs.images.resize_square first")
        pixels = normalise(images, self.mean, self.std).astype(self._dtype, copy=False)
        out = self._session.run(None, {self._input: pixels})[0]
        self._check(out.shape[1], out.shape[2])
        # a copy: ORT's output arrays are views that keep the session's memory arena alive (GBs at 896)
        # for as long as the caller caches them
        return np.array(out, dtype=np.float32)

    def encode(self, image: np.ndarray) -> np.ndarray:
        """image: [S, S, 3] uint8 -> embeddings [tokens, n_embd] float32."""
        return self.encode_batch(np.asarray(image)[None])[0]

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
