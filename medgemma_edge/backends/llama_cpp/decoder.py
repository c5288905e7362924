"""The llama.cpp decoder backend: one model (weights, vocabulary) and any number of contexts over it,
each one KV sequence with token and embedding prefill, single-step decode and logits as numpy.

Images enter as embeddings (never as token ids), decoded in one batch with causal attention off so
the image span is bidirectional, as transformers does with `token_type_ids`.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np

from medgemma_edge.backends.llama_cpp.checks import DecoderShape, check_decoder
from medgemma_edge.backends.llama_cpp.lib import quiet_llama, use_extra_buffers
from medgemma_edge.backends.llama_cpp.tokenizer import LlamaTokenizer
from medgemma_edge.bundle.gguf_header import read_gguf_header
from medgemma_edge.errors import UserError

log = logging.getLogger(__name__)


class LlamaModel:
    """A Gemma 3 GGUF's weights and vocabulary, loaded once and shared by every context."""

    def __init__(self, path: Path, n_gpu_layers: int = 0, vocab_only: bool = False,
                 expect: DecoderShape | None = None) -> None:
        """`expect`: the manifest's shape; without it the header must at least agree with itself."""
        quiet_llama()  # first: it turns a library load failure into a clear error
        import llama_cpp
        self._ll = llama_cpp
        self.path = Path(path)
        header = read_gguf_header(self.path)
        arch = header.get("general.architecture")
        if arch != "gemma3":
            raise UserError(f"{path}: GGUF architecture is {arch!r}, not a Gemma 3 decoder ('gemma3'); "
                            f"pass a decoder GGUF (an mmproj is an image encoder)")
        self.shape = check_decoder(header, self.path, expect)  # before llama.cpp, which aborts on surprises
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.use_extra_bufts = use_extra_buffers()
        # Read, not mmap: llama.cpp repacks most CPU weights into its own buffers, and a mapping would
        # keep the file's pages resident beside them (4B Q4_K_M: 4.36 -> 2.94 GB RSS, load +0.8 s).
        mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
        mparams.vocab_only = vocab_only  # the tokenizer alone (for other backends): metadata, no weights
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise UserError(f"{path}: llama.cpp could not load this GGUF (truncated, corrupt or not a decoder); "
                            f"re-run `medgemma-edge convert` or check the file")
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.tokenizer = LlamaTokenizer(llama_cpp, vocab)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.vocab_only = vocab_only
        self.providers = ["llama.cpp"]

    def new_context(self, n_ctx: int = 4096, n_batch: int = 512, n_threads: int | None = None,
                    kv_f32: bool = False) -> "LlamaDecoder":
        if self.vocab_only or not self._model:
            raise UserError(f"{self.path}: loaded for its vocabulary only; it cannot decode")
        return LlamaDecoder(self, n_ctx, n_batch, n_threads, kv_f32)

    def close(self) -> None:
        if getattr(self, "_model", None):
            self._ll.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # native memory must not outlive the Python object
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down ctypes
            pass


class LlamaDecoder:
    """One llama.cpp context over a LlamaModel: one sequence (seq 0) of KV cache."""

    def __init__(self, model: LlamaModel, n_ctx: int, n_batch: int, n_threads: int | None, kv_f32: bool) -> None:
        llama_cpp = self._ll = model._ll
        self.model, self.path, self.n_embd, self.n_vocab = model, model.path, model.n_embd, model.n_vocab
        self.n_batch = n_batch
        self._ctx = self._batch = self._ebatch = None
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        # the image span must sit in one micro-batch to be decoded non-causally
        cparams.n_batch = cparams.n_ubatch = n_batch
        if n_threads:
            cparams.n_threads = cparams.n_threads_batch = n_threads
        if kv_f32:  # the f16 default KV cache alone moves f32 logits by ~1e-3
            cparams.type_k = cparams.type_v = llama_cpp.GGML_TYPE_F32
        # Sliding-window layers keep only their window (+ a batch): at 4B, 29 of 34 layers stop growing with
        # the context. A rollback past what they still hold replays the kept calls (truncate below).
        cparams.swa_full = False
        cparams.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(model._model, cparams)
        if not self._ctx:
            raise UserError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens (out of memory?); "
                            f"lower --ctx")
        self.n_ctx = n_ctx
        self.n_past = 0
        self.window = model.shape.window  # None: no sliding-window layers
        self._history: list[tuple[int, list[int] | np.ndarray]] = []  # (start, tokens or embeddings) per call
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._ebatch = llama_cpp.llama_batch_init(n_batch, self.n_embd, 1)

    # -- evaluation ---------------------------------------------------------------------------
    def reset(self) -> None:
        self._ll.llama_memory_clear(self._ll.llama_get_memory(self._ctx), True)
        self.n_past = 0
        self._history = []

    def truncate(self, n_keep: int) -> None:
        """Forget cached positions from `n_keep` on, so a shared prefix can be reused. When the sliding-window
        layers no longer hold the window that position n_keep needs, the kept calls are evaluated again."""
        if n_keep >= self.n_past:
            return
        memory = self._ll.llama_get_memory(self._ctx)
        self._ll.llama_memory_seq_rm(memory, 0, n_keep, -1)
        kept = [(start, p if start + len(p) <= n_keep else p[:n_keep - start]) for start, p in self._history
                if start < n_keep]
        self.n_past, self._history = n_keep, kept
        # the next position attends to keys at positions > n_keep - window (ref: llama.cpp is_masked_swa, standard)
        lowest = self._ll.llama_memory_seq_pos_min(memory, 0)
        if self.window and n_keep > 0 and not 0 <= lowest <= max(0, n_keep - self.window + 1):
            log.info("rolling back to %d positions, past what the sliding-window cache holds: replaying %d calls",
                     n_keep, len(kept))
            self.reset()
            for _, payload in kept:
                if isinstance(payload, np.ndarray):
                    self.eval_embeddings(payload, logits=False)
                else:
                    self.eval_tokens(payload, logits=False)

    def eval_tokens(self, tokens: list[int], all_logits: bool = False, logits: bool = True) -> np.ndarray:
        """Prefill token ids causally; returns logits [n, vocab] (all), [1, vocab] (last) or [0, vocab]
        (`logits=False`: the LM head is skipped, 262k columns per row)."""
        start_pos, outs = self.n_past, []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last = start + len(chunk) == len(tokens) and logits
            b = self._batch
            for i, tok in enumerate(chunk):
                b.token[i] = tok
            outs.append(self._decode(b, len(chunk), all_logits, last))
        if tokens:
            self._history.append((start_pos, list(tokens)))
        return np.concatenate(outs) if outs else np.zeros((0, self.n_vocab), np.float32)

    def eval_embeddings(self, embd: np.ndarray, all_logits: bool = False, logits: bool = True) -> np.ndarray:
        """Prefill one image's embeddings [n, n_embd] in one batch with bidirectional attention."""
        n = embd.shape[0]
        if embd.shape[1] != self.n_embd:
            raise UserError(f"image embeddings have width {embd.shape[1]}, decoder {self.path.name} expects "
                            f"{self.n_embd}: the encoder belongs to another model")
        if n > self.n_batch:
            raise UserError(f"an image of {n} tokens does not fit the decoder batch of {self.n_batch}")
        b = self._ebatch
        data = np.ascontiguousarray(embd, dtype=np.float32)  # kept alive across the memmove
        ctypes.memmove(b.embd, data.ctypes.data, data.nbytes)
        self._ll.llama_set_causal_attn(self._ctx, False)
        try:
            start_pos = self.n_past
            out = self._decode(b, n, all_logits, logits)
            self._history.append((start_pos, embd))  # the caller's array (an image span's): no copy
            return out
        finally:
            self._ll.llama_set_causal_attn(self._ctx, True)

    def _decode(self, b: object, n: int, all_logits: bool, last: bool) -> np.ndarray:
        if self.n_past + n > self.n_ctx:
            raise UserError(f"the conversation needs {self.n_past + n} tokens, more than the context of "
                            f"{self.n_ctx}; raise --ctx or shorten the prompt")
        for i in range(n):
            b.pos[i] = self.n_past + i  # type: ignore[attr-defined]
            b.n_seq_id[i] = 1  # type: ignore[attr-defined]
            b.seq_id[i][0] = 0  # type: ignore[attr-defined]
            b.logits[i] = all_logits or (last and i == n - 1)  # type: ignore[attr-defined]
        b.n_tokens = n  # type: ignore[attr-defined]
        rc = self._ll.llama_decode(self._ctx, b)
        if rc != 0:
            raise UserError(f"{self.path.name}: llama_decode failed (code {rc}); the context may be full")
        self.n_past += n
        n_out = n if all_logits else int(last)
        if n_out == 0:
            return np.zeros((0, self.n_vocab), np.float32)
        ptr = self._ll.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy()

    def close(self) -> None:
        ll = self._ll
        for attr in ("_batch", "_ebatch"):
            if getattr(self, attr, None) is not None:
                ll.llama_batch_free(getattr(self, attr))
                setattr(self, attr, None)
        if getattr(self, "_ctx", None):
            ll.llama_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:  # native memory must not outlive the Python object
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down ctypes
            pass
