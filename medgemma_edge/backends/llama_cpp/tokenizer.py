"""The Gemma 3 tokenizer from a GGUF's vocabulary, through llama.cpp: one tokenizer for every backend.

User text is data: `tokenize` never parses special tokens, so `<end_of_turn>` typed into a question
stays ordinary pieces. The chat template places its own control tokens by id (runtime/template.py).
llama.cpp matches user-defined pieces even then; Google's own GGUFs type `<start_of_image>` and
`<end_of_image>` user-defined, so such a marker typed into text is split back into ordinary pieces here
(our converter types the markers as control tokens, so in our bundles it never arises).
"""

from __future__ import annotations

import codecs
import ctypes
import re
from typing import Any

from medgemma_edge.errors import UserError


_MARKER = re.compile(r"<[^<>\s]{1,64}>")  # what a marker piece looks like; whitespace pieces never do


class LlamaTokenizer:
    """Tokenizes with the vocabulary of a loaded llama.cpp model (weights or vocabulary only)."""

    def __init__(self, llama_cpp: Any, vocab: Any) -> None:
        self._ll, self._vocab = llama_cpp, vocab
        self._markers: dict[int, bool] = {}

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as plain text (no special-token parsing, no BOS), never a marker piece."""
        ids = self._tokenize(text)
        found = {i for i in ids if self._is_marker(i)}
        if not found:
            return ids
        # each occurrence of a marker's text: its first character apart, so no piece can match the whole marker
        texts = sorted({self.piece(i).decode("utf-8", "replace") for i in found}, key=len, reverse=True)
        out: list[int] = []
        for chunk in re.split("(" + "|".join(map(re.escape, texts)) + ")", text):
            if chunk in texts:
                out += self._tokenize(chunk[0]) + self._tokenize(chunk[1:])
            elif chunk:
                out += self._tokenize(chunk)
        return out

    def _is_marker(self, token: int) -> bool:
        if token not in self._markers:
            user_defined = self._ll.llama_vocab_get_attr(self._vocab, token) & self._ll.LLAMA_TOKEN_ATTR_USER_DEFINED
            self._markers[token] = bool(user_defined) and bool(_MARKER.fullmatch(self.piece(token).decode("utf-8", "replace")))
        return self._markers[token]

    def _tokenize(self, text: str) -> list[int]:
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

    def special_id(self, text: str) -> int | None:
        """The id of the control token spelled `text` (e.g. "<unused94>"), or None when the vocabulary
        has no such token: only here is text parsed for special tokens, never for user text."""
        raw = text.encode("utf-8")
        buf = (self._ll.llama_token * 4)()
        n = self._ll.llama_tokenize(self._vocab, raw, len(raw), buf, len(buf), False, True)
        special = self._ll.LLAMA_TOKEN_ATTR_CONTROL | self._ll.LLAMA_TOKEN_ATTR_USER_DEFINED
        if n != 1 or not self._ll.llama_vocab_get_attr(self._vocab, buf[0]) & special:  # "thought" is ordinary text
            return None
        piece = ctypes.create_string_buffer(len(raw) + 8)
        k = self._ll.llama_token_to_piece(self._vocab, buf[0], piece, len(piece), 0, True)
        return int(buf[0]) if piece.raw[:max(k, 0)] == raw else None

    @property
    def native_vocab(self) -> Any:
        """llama.cpp's vocabulary handle (valid while the model that owns it is loaded), for libraries that
        read it directly (llguidance builds its grammar tokenizer from it)."""
        return self._vocab

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
