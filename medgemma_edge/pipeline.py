"""The composed pipeline: image encoder + decoder, meeting only through embeddings.

Two caches make follow-up questions cheap: image embeddings keyed by pixel content + encoder
artifact, and the decoder's KV cache, reused up to the longest prefix the new prompt shares with
what was already evaluated.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Union

import numpy as np

from medgemma_edge.chat import BOS_ID, IMAGE_TOKEN_ID, Part, render_prompt
from medgemma_edge.errors import UserError
from medgemma_edge.preprocess import ImageInput, resize_square
from medgemma_edge.sampling import sample


if TYPE_CHECKING:
    from medgemma_edge.session import ChatSession

NOTICE = "Research use only: not for clinical diagnosis (MedGemma model card, intended use)."


class ImageEncoder(Protocol):
    def encode(self, image: np.ndarray) -> np.ndarray: ...  # [S, S, 3] uint8 -> [tokens, hidden]


class Decoder(Protocol):
    n_vocab: int
    n_embd: int

    def tokenize(self, text: str) -> list[int]: ...
    def reset(self) -> None: ...
    def truncate(self, n_keep: int) -> None: ...
    def eval_tokens(self, tokens: list[int], all_logits: bool = False) -> np.ndarray: ...
    def eval_embeddings(self, embd: np.ndarray, all_logits: bool = False) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class ImageSpan:
    """An image's embeddings [tokens, hidden] in a prompt; two spans are the same image if keys match."""

    key: str
    embeddings: np.ndarray

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageSpan) and other.key == self.key

    def __len__(self) -> int:
        return self.embeddings.shape[0]


Atom = Union[int, ImageSpan]  # one token id, or one whole image span (never split)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    image_tokens: int
    stop_reason: str  # "eos" | "length"
    timings: dict[str, float] = field(default_factory=dict)
    reused_tokens: int = 0  # prompt positions served from the KV cache

    def to_json(self, info: dict[str, Any]) -> dict[str, Any]:
        return {
            "text": self.text, "notice": NOTICE, "stop_reason": self.stop_reason,
            "tokens": {"prompt": self.prompt_tokens, "image": self.image_tokens, "generated": len(self.token_ids),
                       "reused": self.reused_tokens},
            "timings": self.timings, **info,
        }


class Generation:
    """A streamed generation: iterate for text pieces; `.result` is set once iteration ends."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._pieces


def _positions(atoms: Sequence[Atom]) -> int:
    return sum(len(a) if isinstance(a, ImageSpan) else 1 for a in atoms)


def _count(tally: dict[str, float] | None, kind: str, n: int, t0: float) -> None:
    if tally is not None:
        tally[f"{kind}_s"] = tally.get(f"{kind}_s", 0.0) + time.perf_counter() - t0
        tally[f"{kind}_n"] = tally.get(f"{kind}_n", 0) + n


class Pipeline:
    def __init__(self, decoder: Decoder, encoder: ImageEncoder | None, *, image_size: int, tokens_per_image: int,
                 eos_ids: Sequence[int], info: dict[str, Any], detokenizer: Any) -> None:
        self.decoder = decoder
        self.encoder = encoder
        self.image_size = image_size
        self.tokens_per_image = tokens_per_image
        self.eos_ids = frozenset(eos_ids)
        self.info = info  # bundle, artifact ids, load time: reported with every result
        self.encoder_calls = 0
        self._detokenizer = detokenizer
        self._image_cache: dict[str, ImageSpan] = {}
        self._kv: list[Atom] = []  # what the decoder's KV cache holds, in order

    # -- images -------------------------------------------------------------------------------
    def encode_images(self, images: Sequence[ImageInput]) -> list[ImageSpan]:
        """Embeddings per image, from the cache when this encoder has seen these pixels before."""
        if images and self.encoder is None:
            raise UserError("this pipeline has no image encoder (text-only decoder); drop --image or load a bundle")
        spans = []
        for image in images:
            pixels = resize_square(image, self.image_size)
            key = hashlib.sha256(pixels.tobytes()).hexdigest() + "|" + str(self.info.get("encoder"))
            if key not in self._image_cache:
                emb = self.encoder.encode(pixels)  # type: ignore[union-attr]
                self.encoder_calls += 1
                if emb.shape[0] != self.tokens_per_image:
                    raise UserError(f"the encoder produced {emb.shape[0]} tokens per image but the chat template "
                                    f"expects {self.tokens_per_image}: encoder and decoder belong to different models")
                self._image_cache[key] = ImageSpan(key, emb)
            spans.append(self._image_cache[key])
        return spans

    # -- prefill ------------------------------------------------------------------------------
    def _atoms(self, parts: list[Part], spans: list[ImageSpan]) -> list[Atom]:
        atoms: list[Atom] = [BOS_ID]
        for part in parts:
            atoms += self.decoder.tokenize(part) if isinstance(part, str) else [spans[part.index]]
        return atoms

    def _eval(self, atoms: Sequence[Atom], all_logits: bool, tally: dict[str, float] | None = None) -> np.ndarray:
        """Evaluate atoms after what the KV cache holds: token runs causally, image spans bidirectionally.

        `tally` accumulates seconds and positions per kind ("text_s", "text_n", "image_s", "image_n").
        """
        outs: list[np.ndarray] = []
        run: list[int] = []
        for atom in [*atoms, None]:
            if isinstance(atom, int):
                run.append(atom)
                continue
            t0 = time.perf_counter()
            if run:
                outs.append(self.decoder.eval_tokens(run, all_logits))
                _count(tally, "text", len(run), t0)
                run = []
            t0 = time.perf_counter()
            if isinstance(atom, ImageSpan):
                outs.append(self.decoder.eval_embeddings(atom.embeddings, all_logits))
                _count(tally, "image", len(atom), t0)
        self._kv += list(atoms)
        return np.concatenate([o for o in outs if len(o)])

    def _sync(self, atoms: list[Atom], tally: dict[str, float] | None = None) -> tuple[np.ndarray, int]:
        """Bring the KV cache to `atoms`, reusing the longest shared prefix; returns last logits and reuse."""
        keep = 0
        for old, new in zip(self._kv, atoms[:-1]):  # the last atom is always evaluated: we need its logits
            if old != new:
                break
            keep += 1
        self.decoder.truncate(_positions(atoms[:keep]))
        self._kv = self._kv[:keep]
        return self._eval(atoms[keep:], all_logits=False, tally=tally), _positions(atoms[:keep])

    @staticmethod
    def _ids(atoms: Sequence[Atom]) -> list[int]:
        return [i for a in atoms for i in ([IMAGE_TOKEN_ID] * len(a) if isinstance(a, ImageSpan) else [a])]

    def _parts(self, prompt: str, n_images: int, system: str | None, raw: bool) -> list[Part]:
        if not raw:
            return render_prompt(prompt, n_images, system)
        if n_images or system:
            raise UserError("raw prompts (no chat template) take no images and no system text")
        return [prompt]  # for base (pretrained, not instruction-tuned) models: text continuation

    def prompt_logits(self, prompt: str, images: Sequence[ImageInput] = (), system: str | None = None,
                      raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Logits at every position of the chat-templated prompt: ids [n], logits [n, vocab] float32.

        `ids` holds 262144 (`<image_soft_token>`) at each position an image embedding filled.
        """
        atoms = self._atoms(self._parts(prompt, len(images), system, raw), self.encode_images(images))
        self.decoder.reset()
        self._kv = []
        logits = self._eval(atoms, all_logits=True)
        return np.asarray(self._ids(atoms), dtype=np.int64), logits.astype(np.float32, copy=False)

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompt: str, images: Sequence[ImageInput] = (), system: str | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stream: bool = False, raw: bool = False,
                 ignore_eos: bool = False) -> GenerationResult | Generation:
        """Answer one user turn (or continue `prompt` verbatim with raw=True).

        `stream=True` returns a Generation to iterate for text pieces; its `.result` is set at the end.
        `ignore_eos` generates exactly `max_new_tokens` (benchmarks time a fixed number of tokens).
        """
        parts = self._parts(prompt, len(images), system, raw)
        return self.run(parts, list(images), max_new_tokens, temperature, top_p, top_k, seed, stream, ignore_eos)

    def run(self, parts: list[Part], images: list[ImageInput], max_new_tokens: int = 256, temperature: float = 0.0,
            top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stream: bool = False,
            ignore_eos: bool = False) -> GenerationResult | Generation:
        """Generate after an already rendered prompt (a chat session renders whole conversations)."""
        gen = Generation(self._generate(parts, images, max_new_tokens, temperature, top_p, top_k, seed, ignore_eos))
        if stream:
            return gen
        for _ in gen:
            pass
        assert gen.result is not None
        return gen.result

    def chat(self, system: str | None = None) -> "ChatSession":
        from medgemma_edge.session import ChatSession

        return ChatSession(self, system)

    def _generate(self, parts: list[Part], images: list[ImageInput], max_new_tokens: int, temperature: float,
                  top_p: float, top_k: int, seed: int | None, ignore_eos: bool) -> Iterator[str]:
        t0 = time.perf_counter()
        spans = self.encode_images(images)
        t_enc = time.perf_counter()
        atoms = self._atoms(parts, spans)
        tally: dict[str, float] = {}
        logits, reused = self._sync(atoms, tally)
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
            if tok in self.eos_ids and not ignore_eos:
                stop = "eos"
                break
            out.append(tok)
            if piece := detok.push(tok):
                text.append(piece)
                yield piece
            if step + 1 < max_new_tokens:
                row = self._eval([tok], all_logits=False)[-1]
        if tail := detok.flush():
            text.append(tail)
            yield tail
        t_end = time.perf_counter()
        n_prompt, decode_s = _positions(atoms), t_end - t_first
        timings = {
            "load_s": self.info.get("load_s", 0.0),
            "image_encode_ms": (t_enc - t0) * 1e3,
            "prefill_ms": (t_prefill - t_enc) * 1e3,
            "prefill_tokens_per_s": (n_prompt - reused) / max(t_prefill - t_enc, 1e-9),
            **{f"prefill_{kind}_tokens_per_s": tally.get(f"{kind}_n", 0) / max(tally.get(f"{kind}_s", 0.0), 1e-9)
               for kind in ("text", "image") if tally.get(f"{kind}_n")},
            "time_to_first_token_ms": (t_first - t0) * 1e3,
            "decode_tokens_per_s": (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0,
        }
        n_img = sum(len(s) for s in spans)
        return GenerationResult("".join(text), out, n_prompt, n_img, stop, timings, reused)  # type: ignore[return-value]
