"""The previous release's ONNX decoder graph (inputs `past_key_i`, `embeds_mask`), kept so its bundles
still load and answer the same.

That graph returns logits for every position and a new, concatenated KV cache per call; this
context keeps the cache as numpy arrays and builds the two additive masks (global, sliding window)
with the same rule as transformers: (causal and within the window) or (same image).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medgemma_edge.backends.onnx.kv_cache import NEG
from medgemma_edge.errors import UserError

LEGACY_INPUTS = frozenset({"input_ids", "inputs_embeds", "embeds_mask", "mask_global", "past_key_0"})


class LegacyOnnxDecoder:
    """One sequence of KV cache over a previous-release decoder graph."""

    def __init__(self, model: Any, n_ctx: int) -> None:
        t = model.config
        self.model, self.path = model, model.path
        self.n_embd, self.n_vocab, self.n_ctx = model.n_embd, model.n_vocab, n_ctx
        self.n_layers, self.window = t["num_layers"], t["sliding_window"]
        self._kv_shape = (1, t["num_kv_heads"], 0, t["head_dim"])
        self.reset()

    def reset(self) -> None:
        self._past = [np.zeros(self._kv_shape, np.float32) for _ in range(2 * self.n_layers)]
        self._image = np.zeros(0, np.int64)  # per cached position: image span id, or -1 for text
        self.n_past = 0

    def truncate(self, n_keep: int) -> None:
        self._past = [p[:, :, :n_keep] for p in self._past]
        self._image = self._image[:n_keep]
        self.n_past = n_keep

    def eval_tokens(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        ids = np.asarray(tokens, np.int64)[None]
        return self._run(ids, np.zeros((1, ids.shape[1], self.n_embd), np.float32), image=False, all_logits=all_logits)

    def eval_embeddings(self, embd: np.ndarray, all_logits: bool = False) -> np.ndarray:
        if embd.shape[1] != self.n_embd:
            raise UserError(f"image embeddings have width {embd.shape[1]}, decoder {self.path.name} expects "
                            f"{self.n_embd}: the encoder belongs to another model")
        n = embd.shape[0]
        return self._run(np.zeros((1, n), np.int64), embd[None].astype(np.float32), image=True, all_logits=all_logits)

    def _masks(self, s: int, image: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = self.n_past
        q = np.arange(p, p + s)[:, None]
        k = np.arange(p + s)[None, :]
        span = (self._image.max(initial=-1) + 1) if image else -1
        kv_image = np.concatenate([self._image, np.full(s, span)])
        same_image = (kv_image[None, :] == span) & image  # a whole image span sees itself both ways
        causal = k <= q
        allow_global = causal | same_image
        allow_local = (causal & (q - k < self.window)) | same_image
        to_mask = lambda allow: np.where(allow, np.float32(0), NEG)[None, None].astype(np.float32)  # noqa: E731
        return to_mask(allow_global), to_mask(allow_local), kv_image

    def _run(self, ids: np.ndarray, embeds: np.ndarray, image: bool, all_logits: bool) -> np.ndarray:
        s = ids.shape[1]
        if self.n_past + s > self.n_ctx:
            raise UserError(f"the conversation needs {self.n_past + s} tokens, more than the context of "
                            f"{self.n_ctx}; raise --ctx or shorten the prompt")
        mask_global, mask_local, kv_image = self._masks(s, image)
        feed = {"input_ids": ids, "inputs_embeds": embeds, "embeds_mask": np.full((1, s), float(image), np.float32),
                "position_ids": np.arange(self.n_past, self.n_past + s, dtype=np.int64)[None],
                "mask_global": mask_global, "mask_local": mask_local}
        feed.update({f"past_{kv}_{i}": self._past[2 * i + j] for i in range(self.n_layers)
                     for j, kv in enumerate(("key", "value"))})
        logits, *present = self.model.session.run(None, feed)
        self._past, self._image = present, kv_image  # only after success: a failed run changes nothing
        self.n_past += s
        return logits[0] if all_logits else logits[0, -1:]

    def close(self) -> None:
        self._past = []
