"""The llama.cpp image encoder: an mmproj GGUF run by libmtmd, returning embeddings as numpy.

mtmd would letterbox an arbitrary image; we hand it pixels already stretched to the encoder's
square size (inputs/images.py), where its own resize is a plain copy, so it sees what transformers sees.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_edge.backends.llama_cpp.checks import check_mmproj
from medgemma_edge.backends.llama_cpp.lib import quiet_llama
from medgemma_edge.bundle.gguf_header import read_gguf_header
from medgemma_edge.errors import UserError


class MtmdEncoder:
    """Encodes square RGB uint8 images [S, S, 3] into image-token embeddings [tokens, hidden]."""

    def __init__(self, mmproj: Path, vocab_gguf: Path, n_embd: int, vision: dict[str, Any], tokens_per_image: int,
                 n_threads: int | None = None, use_gpu: bool = False) -> None:
        """`vision`: the manifest's vision config, which the mmproj header must match before mtmd reads it."""
        quiet_llama()  # first: it turns a library load failure into a clear error
        import llama_cpp
        from llama_cpp import mtmd_cpp
        self._ll, self._mt = llama_cpp, mtmd_cpp
        self.path = mmproj
        self.providers = ["llama.cpp"]
        # mtmd aborts the process on shapes it did not expect (and cannot check the width against a
        # vocabulary-only text model), so every hyperparameter and tensor shape is checked first
        check_mmproj(read_gguf_header(mmproj), mmproj, vision, n_embd, tokens_per_image)
        self.n_embd = n_embd
        # mtmd needs a text model for its vocabulary and to check the embedding width; the
        # vocabulary-only load reads metadata, not weights.
        mparams = llama_cpp.llama_model_default_params()
        mparams.vocab_only = True
        self._vocab_model = llama_cpp.llama_model_load_from_file(str(vocab_gguf).encode(), mparams)
        if not self._vocab_model:
            raise UserError(f"{vocab_gguf}: llama.cpp could not read this GGUF's vocabulary; re-run `medgemma-edge convert`")
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.warmup = False
        if n_threads:
            params.n_threads = n_threads
        self._ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self._vocab_model, params)
        if not self._ctx:
            self.close()
            raise UserError(f"{mmproj}: mtmd could not load this mmproj (corrupt, truncated, or its projection width "
                            f"does not match the decoder's); re-run `medgemma-edge convert`")
        if not mtmd_cpp.mtmd_support_vision(self._ctx):
            self.close()
            raise UserError(f"{mmproj}: this mmproj has no vision encoder")

    def encode(self, image: np.ndarray) -> np.ndarray:
        """image: [S, S, 3] uint8 -> embeddings [tokens, n_embd] float32."""
        mt = self._mt
        h, w, _ = image.shape
        data = np.ascontiguousarray(image, dtype=np.uint8)
        bitmap = mt.mtmd_bitmap_init(w, h, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mt.mtmd_input_chunks_init()
        try:
            text = mt.mtmd_input_text(mt.mtmd_default_marker(), len(mt.mtmd_default_marker()), False, True)
            bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mt.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise UserError(f"{self.path.name}: mtmd could not prepare the image")
            chunk = next((mt.mtmd_input_chunks_get(chunks, i) for i in range(mt.mtmd_input_chunks_size(chunks))
                          if mt.mtmd_input_chunk_get_type(mt.mtmd_input_chunks_get(chunks, i))
                          == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE), None)
            if chunk is None:
                raise UserError(f"{self.path.name}: mtmd produced no image chunk")
            if mt.mtmd_encode_chunk(self._ctx, chunk) != 0:
                raise UserError(f"{self.path.name}: mtmd failed to encode the image")
            n_tokens = mt.mtmd_input_chunk_get_n_tokens(chunk)
            out = mt.mtmd_get_output_embd(self._ctx)
            return np.ctypeslib.as_array(out, shape=(n_tokens, self.n_embd)).copy()
        finally:
            mt.mtmd_input_chunks_free(chunks)
            mt.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._mt.mtmd_free(self._ctx)
            self._ctx = None
        if getattr(self, "_vocab_model", None):
            self._ll.llama_model_free(self._vocab_model)
            self._vocab_model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down ctypes
            pass
