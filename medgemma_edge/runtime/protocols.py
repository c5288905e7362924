"""The seams of the runtime: a tokenizer, a decoder model with its contexts, and an image encoder.

Encoders and decoders meet only through embeddings [tokens, hidden], which is what lets any
encoder artifact feed any decoder artifact. Backends implement these structurally; they never
import this module.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Detokenizer(Protocol):
    def push(self, token: int) -> str: ...  # text completed by this token (may be "")
    def flush(self) -> str: ...


class Tokenizer(Protocol):
    def tokenize(self, text: str) -> list[int]: ...  # plain text: never special-token parsing, no BOS
    def piece(self, token: int) -> bytes: ...
    def special_id(self, text: str) -> int | None: ...  # a control token by its text ("<unused94>"), if any
    def detokenizer(self) -> Detokenizer: ...


class Decoder(Protocol):
    """One KV sequence: what a prompt cache holds."""

    n_vocab: int
    n_embd: int
    n_ctx: int
    n_past: int

    def reset(self) -> None: ...
    def truncate(self, n_keep: int) -> None: ...
    def eval_tokens(self, tokens: list[int], all_logits: bool = False) -> np.ndarray: ...  # [n or 1, vocab]
    def eval_embeddings(self, embd: np.ndarray, all_logits: bool = False) -> np.ndarray: ...  # one image span
    def close(self) -> None: ...


class DecoderModel(Protocol):
    """Weights loaded once; every context over them is a separate Decoder."""

    n_vocab: int
    n_embd: int
    providers: list[str]

    def close(self) -> None: ...


class ImageEncoder(Protocol):
    providers: list[str]

    def encode(self, image: np.ndarray) -> np.ndarray: ...  # [S, S, 3] uint8 -> [tokens, hidden] float32
    def close(self) -> None: ...
