"""Structured answers: decoding constrained to a JSON schema, with llguidance (the engine llama.cpp uses).

Each step, llguidance computes which tokens may come next (a bitmask over the vocabulary) and the
others are set to -inf before the token is drawn, so every completed answer is a JSON document that
validates against the schema. The JSON is compact (no free whitespace: small models loop on it).
Nothing here counts tokens: a document still open at max_new_tokens is reported as incomplete
(`GenerationResult.schema_valid` False, stop_reason "length"), never as valid; bound the schema
(`maxLength`, `maxItems`, enums) so its longest document fits.

The grammar tokenizer is built from the llama.cpp vocabulary every backend tokenizes with (so it serves
the ONNX decoder too): once per tokenizer, 1 to 10 s for Gemma 3's 262,144 pieces, then reused.
ref: llguidance 1.9 python API (LLMatcher, llguidance.llamacpp.lltokenizer_from_vocab, llguidance.numpy).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
import weakref
from collections.abc import Collection
from typing import Any

import numpy as np

from medgemma_edge.errors import UserError
from medgemma_edge.runtime.thinking import ThinkingMarkers

log = logging.getLogger(__name__)

JSON_OPTIONS = {"whitespace_flexible": False}  # compact: "," and ":" with nothing around them
MAX_THOUGHT_SPACE = 4  # whitespace allowed between a thought and the document

_lock = threading.Lock()
_tokenizers: "weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], Any]]" = weakref.WeakKeyDictionary()


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError:
        raise UserError("structured answers (json_schema / --json-schema) need the llguidance package: "
                        "pip install 'llguidance==1.9.1'") from None
    return llguidance


def check_schema(schema: Any) -> None:
    """Refuse, in one line, a schema llguidance cannot compile (bad types, dangling $ref, unsupported or
    unsatisfiable keywords); needs no model."""
    llg = _llguidance()
    if not isinstance(schema, dict):
        raise UserError(f"json_schema: a schema must be a JSON object such as {{\"type\": \"object\", ...}}, "
                        f"not {type(schema).__name__}")
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise UserError(f"json_schema: {_one_line(str(exc))}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, None)
    if is_error:
        raise UserError(f"json_schema: {_one_line(messages[0] if messages else 'invalid schema')}")
    for m in messages:  # e.g. an unknown "format": llguidance treats it as a plain string
        log.warning("json_schema: %s", _one_line(m))


def _one_line(text: str) -> str:
    return " ".join(text.split()).rstrip(".")


def grammar_tokenizer(tokenizer: Any, n_logits: int, eos_ids: Collection[int]) -> Any:
    """llguidance's tokenizer for this vocabulary, `n_logits` wide (ids past the vocabulary never allowed),
    ending on any of `eos_ids`. Built once per tokenizer and kept while the tokenizer lives."""
    _llguidance()
    vocab = getattr(tokenizer, "native_vocab", None)
    if vocab is None:
        raise UserError("json_schema: this tokenizer has no llama.cpp vocabulary to constrain decoding with")
    key = (n_logits, tuple(sorted(eos_ids)))
    with _lock:  # one build even when several callers ask at once
        built = _tokenizers.setdefault(tokenizer, {})
        if key not in built:
            from llguidance.llamacpp import lltokenizer_from_vocab

            t0 = time.perf_counter()
            with warnings.catch_warnings():  # it calls llama-cpp-python's deprecated llama_token_get_attr per token
                warnings.simplefilter("ignore", DeprecationWarning)
                lltok = lltokenizer_from_vocab(vocab, n_vocab=n_logits, eos_token=list(key[1]))
            if lltok.vocab_size != n_logits:  # it pads up to n_logits, never down
                raise UserError(f"json_schema: the vocabulary has {lltok.vocab_size} tokens but the decoder gives "
                                f"{n_logits} logits; the bundle mixes models, convert again")
            log.info("grammar tokenizer built in %.1f s", time.perf_counter() - t0)
            built[key] = lltok
        return built[key]


def _grammar(llg: Any, schema: str, thought: ThinkingMarkers | None) -> str:
    """The JSON schema's grammar; with `thought`, one optional thought (`<unused94>` free text
    `<unused95>`) may come first, as a thinking model writes before its answer."""
    if thought is None or thought.open is None or thought.close is None:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    parsed = json.loads(schema)
    own = parsed.get("x-guidance") if isinstance(parsed.get("x-guidance"), dict) else {}
    options = json.dumps({**parsed, "x-guidance": {**own, **JSON_OPTIONS}})  # compact here too
    return llg.LLMatcher.grammar_from_lark(
        "start: thought? document\n"
        f"thought: <[{thought.open}]> THOUGHT <[{thought.close}]> SPACE\n"
        "THOUGHT: /(?s:.*)/\n"
        f"SPACE: /[ \\n]{{0,{MAX_THOUGHT_SPACE}}}/\n"
        f"document: %json {options}\n")


class JsonConstraint:
    """One answer constrained to a JSON schema: `mask` before each draw, `accept` each token drawn."""

    def __init__(self, tokenizer: Any, schema: str, n_logits: int, eos_ids: Collection[int],
                 thought: ThinkingMarkers | None = None) -> None:
        t0 = time.perf_counter()
        self._llg = llg = _llguidance()
        self.n_logits = n_logits
        self._lltok = grammar_tokenizer(tokenizer, n_logits, eos_ids)
        self._matcher = llg.LLMatcher(self._lltok, _grammar(llg, schema, thought), log_level=0)
        if self._matcher.is_error():
            raise UserError(f"json_schema: {_one_line(self._matcher.get_error())}")
        self.setup_ms = (time.perf_counter() - t0) * 1e3
        self._bitmask = llg.numpy.allocate_token_bitmask(1, self._lltok.vocab_size)
        self.mask_ms: list[float] = []  # per token: the mask computed and, where needed, applied

    def mask(self, row: np.ndarray, greedy: bool) -> None:
        """Set every token the schema does not allow next to -inf in `row` (float32 [n_logits], in place).

        Greedy: when the row's argmax is allowed it is the answer whatever the mask, so only its bit is read."""
        t0 = time.perf_counter()
        self._llg.numpy.fill_next_token_bitmask(self._matcher, self._bitmask)
        if self._matcher.is_error():
            raise UserError(f"json_schema: {_one_line(self._matcher.get_error())}")
        words = self._bitmask[0]
        best = int(np.argmax(row))
        if not (greedy and (int(words[best >> 5]) >> (best & 31)) & 1):
            allowed = np.unpackbits(words.view(np.uint8), bitorder="little", count=self.n_logits).view(bool)
            if not allowed.any():
                raise UserError("json_schema: no token can continue the document (the schema cannot be satisfied "
                                "from here); check the schema's bounds")
            np.copyto(row, -np.inf, where=~allowed)
        self.mask_ms.append((time.perf_counter() - t0) * 1e3)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise UserError(f"json_schema: token {token} does not fit the schema ({_one_line(self._matcher.get_error())})")

    @property
    def stopped(self) -> bool:
        """The document is complete and nothing may follow it (or an end token was accepted)."""
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """What was accepted so far is a whole document that validates against the schema."""
        return bool(self._matcher.is_accepting())

    def timings(self) -> dict[str, float]:
        ms = np.asarray(self.mask_ms) if self.mask_ms else np.zeros(1)
        return {"schema_setup_ms": self.setup_ms, "schema_mask_ms_mean": float(ms.mean()),
                "schema_mask_ms_p95": float(np.percentile(ms, 95))}
