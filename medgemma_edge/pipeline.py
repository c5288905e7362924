"""The composed pipeline: image encoder + decoder, meeting only through embeddings."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from medgemma_edge.errors import UserError
from medgemma_edge.chat import BOS_ID, IMAGE_TOKEN_ID, ImageSlot, Part, render_prompt
from medgemma_edge.preprocess import ImageInput, resize_square
from medgemma_edge.sampling import sample

log = logging.getLogger(__name__)

NOTICE = "Research use only: not for clinical diagnosis (MedGemma model card, intended use)."


class ImageEncoder(Protocol):
    def encode(self, image: np.ndarray) -> np.ndarray: ...  # [S, S, 3] uint8 -> [tokens, hidden]


class Decoder(Protocol):
    n_vocab: int
    n_embd: int

    def tokenize(self, text: str) -> list[int]: ...
    def reset(self) -> None: ...
    def eval_tokens(self, tokens: list[int], all_logits: bool = False) -> np.ndarray: ...
    def eval_embeddings(self, embd: np.ndarray, all_logits: bool = False) -> np.ndarray: ...


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    image_tokens: int
    stop_reason: str  # "eos" | "length"
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self, info: dict[str, Any]) -> dict[str, Any]:
        return {
            "text": self.text, "notice": NOTICE, "stop_reason": self.stop_reason,
            "tokens": {"prompt": self.prompt_tokens, "image": self.image_tokens, "generated": len(self.token_ids)},
            "timings": self.timings, **info,
        }


class Generation:
    """A streamed generation: iterate for text pieces; `.result` is set once iteration ends."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._pieces


class Pipeline:
    def __init__(self, decoder: Decoder, encoder: ImageEncoder | None, *, image_size: int, tokens_per_image: int,
                 eos_ids: Sequence[int], info: dict[str, Any], detokenizer: Any) -> None:
        self.decoder = decoder
        self.encoder = encoder
        self.image_size = image_size
        self.tokens_per_image = tokens_per_image
        self.eos_ids = frozenset(eos_ids)
        self.info = info  # bundle, artifact ids, load time: reported with every result
        self._detokenizer = detokenizer

    # -- images -------------------------------------------------------------------------------
    def encode_images(self, images: Sequence[ImageInput]) -> list[np.ndarray]:
        if images and self.encoder is None:
            raise UserError("this pipeline has no image encoder (text-only decoder); drop --image or load a bundle")
        out = []
        for image in images:
            emb = self.encoder.encode(resize_square(image, self.image_size))  # type: ignore[union-attr]
            if emb.shape[0] != self.tokens_per_image:
                raise UserError(f"the encoder produced {emb.shape[0]} tokens per image but the chat template expects "
                           f"{self.tokens_per_image}: encoder and decoder belong to different models")
            out.append(emb)
        return out

    # -- prefill ------------------------------------------------------------------------------
    def _prefill(self, parts: list[Part], embeds: list[np.ndarray], all_logits: bool) -> tuple[list[int], np.ndarray]:
        """Run the whole templated prompt; returns the ids (image positions = 262144) and logits."""
        dec = self.decoder
        dec.reset()
        ids: list[int] = [BOS_ID]
        pending: list[int] = [BOS_ID]
        outs: list[np.ndarray] = []
        for part in parts:
            if isinstance(part, str):
                toks = dec.tokenize(part)
                ids += toks
                pending += toks
                continue
            if pending:
                outs.append(dec.eval_tokens(pending, all_logits))
                pending = []
            emb = embeds[part.index]
            ids += [IMAGE_TOKEN_ID] * emb.shape[0]
            outs.append(dec.eval_embeddings(emb, all_logits))
        if pending:
            outs.append(dec.eval_tokens(pending, all_logits))
        logits = np.concatenate([o for o in outs if len(o)])
        return ids, logits

    def _parts(self, prompt: str, n_images: int, system: str | None, raw: bool) -> list[Part]:
        if not raw:
            return render_prompt(prompt, n_images, system)
        if n_images or system:
            raise UserError("raw prompts (no chat template) take no images and no system text")
        return [prompt]  # for base (pretrained, not instruction-tuned) models: text continuation

    def prompt_logits(self, prompt: str, images: Sequence[ImageInput] = (), system: str | None = None,
                      raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Logits at every position of the chat-templated prompt: ids [n], logits [n, vocab] float32."""
        embeds = self.encode_images(images)
        ids, logits = self._prefill(self._parts(prompt, len(images), system, raw), embeds, all_logits=True)
        return np.asarray(ids, dtype=np.int64), logits.astype(np.float32, copy=False)

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompt: str, images: Sequence[ImageInput] = (), system: str | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stream: bool = False, raw: bool = False) -> GenerationResult | Generation:
        """Answer one user turn (or continue `prompt` verbatim with raw=True).

        `stream=True` returns a Generation to iterate for text pieces; its `.result` is set at the end.
        """
        parts = self._parts(prompt, len(images), system, raw)
        gen = Generation(self._generate(parts, list(images), max_new_tokens, temperature, top_p, top_k, seed))
        if stream:
            return gen
        for _ in gen:
            pass
        assert gen.result is not None
        return gen.result

    def _generate(self, parts: list[Part], images: list[ImageInput], max_new_tokens: int, temperature: float,
                  top_p: float, top_k: int, seed: int | None) -> Iterator[str]:
        t0 = time.perf_counter()
        embeds = self.encode_images(images)
        t_enc = time.perf_counter()
        ids, logits = self._prefill(parts, embeds, all_logits=False)
        t_prefill = time.perf_counter()
        rng = np.random.default_rng(seed)
        detok = self._detokenizer()
        out: list[int] = []
        text: list[str] = []
        stop = "length"
        t_first = t_prefill
        row = logits[-1]
        for step in range(max_new_tokens):
            tok = sample(row, rng, temperature, top_k, top_p)
            if step == 0:
                t_first = time.perf_counter()
            if tok in self.eos_ids:
                stop = "eos"
                break
            out.append(tok)
            piece = detok.push(tok)
            if piece:
                text.append(piece)
                yield piece
            if step + 1 < max_new_tokens:
                row = self.decoder.eval_tokens([tok])[-1]
        tail = detok.flush()
        if tail:
            text.append(tail)
            yield tail
        t_end = time.perf_counter()
        n_img = sum(e.shape[0] for e in embeds)
        decode_s = t_end - t_first
        timings = {
            "load_s": self.info.get("load_s", 0.0),
            "image_encode_ms": (t_enc - t0) * 1e3,
            "prefill_ms": (t_prefill - t_enc) * 1e3,
            "prefill_tokens_per_s": len(ids) / max(t_prefill - t_enc, 1e-9),
            "time_to_first_token_ms": (t_first - t0) * 1e3,
            "decode_tokens_per_s": (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0,
        }
        return GenerationResult("".join(text), out, len(ids), n_img, stop, timings)  # type: ignore[return-value]
