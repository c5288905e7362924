"""The Gemma 3 tokenizer from a GGUF's vocabulary, through llama.cpp: one tokenizer for every backend.

User text is data: `tokenize` never parses special tokens, so `<end_of_turn>` typed into a question
stays ordinary pieces. The chat template places its own control tokens by id (runtime/template.py).
"""

from __future__ import annotations

import codecs
import ctypes
from typing import Any

from medgemma_edge.errors import UserError


class LlamaTokenizer:
    """Tokenizes with the vocabulary of a loaded llama.cpp model (weights or vocabulary only)."""

    def __init__(self, llama_cpp: Any, vocab: Any) -> None:
        self._ll, self._vocab = llama_cpp, vocab

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as plain text (no special-token parsing, no BOS)."""
        raw = text.encode("utf-8")
        buf = (self._ll.llama_token * (len(raw) + 8))()
        n = self._ll.llama_tokenize(self._vocab, raw, len(raw), buf, len(buf), False, False)
        if n < 0:
            raise UserError(f"prompt too long to tokenize ({len(raw)} bytes)")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenizer(self) -> "Detokenizer":
        return Detokenizer(self)


class Detokenizer:
    """Turns a token stream into text, holding back bytes of a UTF-8 character split across tokens."""

    def __init__(self, tokenizer: LlamaTokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self._tokenizer.piece(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
