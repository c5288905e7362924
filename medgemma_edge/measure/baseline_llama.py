"""llama.cpp's own multimodal path, as llama-mtmd-cli and Ollama users get it: the baseline `bench` compares to.

The text model and the mmproj are loaded by llama.cpp and libmtmd, the prompt is tokenized by
`mtmd_tokenize` (image markers expanded by mtmd itself) and evaluated chunk by chunk with mtmd's
helpers; tokens are picked by llama.cpp's greedy sampler. Nothing of our pipeline is involved
except the pixels, which are the same pre-resized squares every backend gets.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_edge.backends.llama_cpp.lib import quiet_llama, use_extra_buffers
from medgemma_edge.errors import UserError
from medgemma_edge.runtime.template import BOS_ID, CONTROL_TEXT, Control, ImageSlot, Markers, Part


def mtmd_prompt(parts: Sequence[Part], markers: Markers = Markers()) -> str:
    """Our rendered prompt as mtmd text: each image slot becomes mtmd's marker, without the image
    delimiters around it, because mtmd adds Gemma 3's itself; BOS is left to mtmd too."""
    from llama_cpp import mtmd_cpp

    marker = mtmd_cpp.mtmd_default_marker().decode()
    skipped = (BOS_ID, markers.boi, markers.eoi)
    return "".join(marker if isinstance(p, ImageSlot) else "" if isinstance(p, Control) and p.id in skipped
                   else CONTROL_TEXT[p.id] if isinstance(p, Control) else p for p in parts)


class LlamaCppBaseline:
    """One llama.cpp context plus one mtmd context over the same GGUF files as our all-GGUF combination."""

    def __init__(self, decoder_gguf: Path, mmproj: Path, n_ctx: int = 4096, n_threads: int | None = None) -> None:
        quiet_llama()  # first: it turns a library load failure into a clear error
        import llama_cpp
        from llama_cpp import mtmd_cpp
        self._ll, self._mt = llama_cpp, mtmd_cpp
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = use_extra_buffers()  # as our decoder's: no AMX crash (llama_cpp/lib.py)
        self._model = llama_cpp.llama_model_load_from_file(str(decoder_gguf).encode(), model_params)
        if not self._model:
            raise UserError(f"{decoder_gguf}: llama.cpp could not load this GGUF; re-run `medgemma-edge convert`")
        cparams = llama_cpp.llama_context_default_params()  # llama.cpp's defaults, except the shared knobs
        cparams.n_ctx = n_ctx
        # ref: llama.cpp common/common.h `swa_full = false`, what llama-mtmd-cli and llama-server run with (the C
        # API's default is true): sliding-window layers keep only their window, which matters for long studies
        cparams.swa_full = False
        if n_threads:
            cparams.n_threads = cparams.n_threads_batch = n_threads
        self.n_batch = cparams.n_batch
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        mparams = mtmd_cpp.mtmd_context_params_default()
        mparams.use_gpu = False
        mparams.print_timings = False
        if n_threads:
            mparams.n_threads = n_threads
        self._mtmd = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self._model, mparams) if self._ctx else None
        if not self._mtmd:
            self.close()
            raise UserError(f"{mmproj}: llama.cpp could not create a context or load this mmproj; check the bundle")
        self._sampler = llama_cpp.llama_sampler_init_greedy()
        self.n_past = 0

    def _chunks(self, text: str, images: Sequence[np.ndarray]) -> Any:
        mt = self._mt
        bitmaps = [mt.mtmd_bitmap_init(im.shape[1], im.shape[0],
                                       np.ascontiguousarray(im, np.uint8).ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
                   for im in images]
        chunks = mt.mtmd_input_chunks_init()
        raw = text.encode()
        inp = mt.mtmd_input_text(raw, len(raw), self.n_past == 0, True)  # BOS on the first turn only
        array = (mt.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
        rc = mt.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(inp), array, len(bitmaps))
        for b in bitmaps:
            mt.mtmd_bitmap_free(b)
        if rc != 0:
            mt.mtmd_input_chunks_free(chunks)
            raise UserError(f"mtmd could not tokenize the prompt (code {rc}): image count and markers disagree")
        return chunks

    def prefill(self, text: str, images: Sequence[np.ndarray] = ()) -> dict[str, float]:
        """Evaluate a prompt after what the context holds. This is `mtmd_helper_eval_chunks`' own loop,
        unrolled so that image encode, image decode and text decode are timed apart."""
        mt = self._mt
        chunks = self._chunks(text, images)
        tally = {"encode_s": 0.0, "image_s": 0.0, "image_n": 0, "text_s": 0.0, "text_n": 0}
        n_past = ctypes.c_int32(self.n_past)
        try:
            n_chunks = mt.mtmd_input_chunks_size(chunks)
            for i in range(n_chunks):
                chunk = mt.mtmd_input_chunks_get(chunks, i)
                n_tok = mt.mtmd_input_chunk_get_n_tokens(chunk)
                t0 = time.perf_counter()
                if mt.mtmd_input_chunk_get_type(chunk) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    if mt.mtmd_encode_chunk(self._mtmd, chunk) != 0:
                        raise UserError("mtmd failed to encode an image")
                    t1 = time.perf_counter()
                    tally["encode_s"] += t1 - t0
                    rc = mt.mtmd_helper_decode_image_chunk(self._mtmd, self._ctx, chunk,
                                                           mt.mtmd_get_output_embd(self._mtmd), n_past.value, 0,
                                                           self.n_batch, ctypes.byref(n_past),
                                                           mt.mtmd_helper_post_decode_callback(), None)
                    tally["image_s"] += time.perf_counter() - t1
                    tally["image_n"] += n_tok
                else:
                    rc = mt.mtmd_helper_eval_chunk_single(self._mtmd, self._ctx, chunk, n_past.value, 0,
                                                          self.n_batch, i == n_chunks - 1, ctypes.byref(n_past))
                    tally["text_s"] += time.perf_counter() - t0
                    tally["text_n"] += n_tok
                if rc != 0:
                    raise UserError(f"llama.cpp failed to decode prompt chunk {i} (code {rc}); context full?")
        finally:
            mt.mtmd_input_chunks_free(chunks)
        self.n_past = n_past.value
        return tally

    def next_token(self) -> int:
        return int(self._ll.llama_sampler_sample(self._sampler, self._ctx, -1))

    def feed(self, token: int) -> None:
        """Decode one generated token (what llama-mtmd-cli does between samples)."""
        arr = (self._ll.llama_token * 1)(token)
        if self._ll.llama_decode(self._ctx, self._ll.llama_batch_get_one(arr, 1)) != 0:
            raise UserError("llama.cpp failed to decode a generated token; context full?")
        self.n_past += 1

    def close(self) -> None:
        ll = self._ll
        for attr, free in (("_sampler", ll.llama_sampler_free), ("_mtmd", self._mt.mtmd_free),
                           ("_ctx", ll.llama_free), ("_model", ll.llama_model_free)):
            if getattr(self, attr, None):
                free(getattr(self, attr))
                setattr(self, attr, None)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down ctypes
            pass
