"""Scoring one item: multiple choice by option log-likelihood and by the generated letter; free text by match.

Prompts (the same for every artifact, so scores compare):
- generated letter: the question, the options as "A. text" lines, then "Answer with the letter of the correct
  option." (with `raw`, for base models without a chat template: "Question: ...", the option lines, "Answer:").
- log-likelihood ("cloze"): the question alone is asked and each option's text is scored as the answer, the
  model's turn being exactly that text (raw: "Question: ...\\nAnswer:" then " " + the text). The score is the sum
  of the option tokens' log-probabilities; the highest wins, ties go to the earlier letter. No instruction
  following is needed, so base models can be scored too. Longer options are penalised by construction: keep
  options of similar length when comparing items across sets.

Letter extraction from a generated answer (its reasoning, if any, is not read), in this order:
1. an explicit statement: the LAST "answer: X", "answer is X", "option X", "final answer X" (any case, X in
   parentheses or not), X one of the item's letters;
2. the answer opens with the letter: optional spaces, `*`, `(` or `[`, then X, then the end, a space or one of
   `.):]*,` ("B", "(B)", "B. Four", "**B**");
3. the text of exactly one option appears in the answer (normalised as below, as whole words);
4. otherwise none: the item counts as wrong.
Rule 2 reads "A" or "I" followed by a space and a lower-case word as English ("A pneumothorax is...", "I think"),
not as a choice. Letters are upper case in rules 1 and 2 ("the answer is a ..." chooses nothing by rule 1).

Free text: exact match compares the answers stripped of surrounding whitespace; normalised match compares them
after NFKC, lower case, punctuation removed, the articles a/an/the removed and whitespace collapsed
(ref: the SQuAD evaluation script's normalize_answer).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

import numpy as np

from medgemma_edge.errors import PromptTooLong
from medgemma_edge.inputs.images import ImageInput
from medgemma_edge.runtime.caches import positions
from medgemma_edge.runtime.pipeline import Pipeline

LETTER_INSTRUCTION = "Answer with the letter of the correct option."


def mc_prompt(question: str, options: Sequence[tuple[str, str]], raw: bool = False) -> str:
    listed = "\n".join(f"{letter}. {text}" for letter, text in options)
    if raw:
        return f"Question: {question.strip()}\n{listed}\nAnswer:"
    return f"{question.strip()}\n\n{listed}\n\n{LETTER_INSTRUCTION}"


def cloze_prompt(question: str, raw: bool = False) -> str:
    return f"Question: {question.strip()}\nAnswer:" if raw else question.strip()


def cloze_answer(text: str, raw: bool = False) -> str:
    return f" {text}" if raw else text


def log_softmax(rows: np.ndarray) -> np.ndarray:
    """rows: [n, vocab] -> log-probabilities [n, vocab], in float64."""
    x = rows.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def option_logliks(pipe: Pipeline, prompt: str, answers: Sequence[str], images: Sequence[ImageInput] = (),
                   system: str | None = None, raw: bool = False) -> list[tuple[float, int]]:
    """(sum of log-probabilities, token count) of each answer text as the model's reply to `prompt`.

    The prompt is prefilled once; each answer then costs its own tokens (the scratch cache keeps the prompt and
    re-evaluates only its last token, whose logits predict the answer's first token)."""
    spans = pipe.encode_images(images)
    prefix = pipe.atoms(pipe.parts(prompt, len(images), system, raw), spans)
    cache = pipe.cache_for(None)
    out: list[tuple[float, int]] = []
    for text in answers:
        ids = pipe.tokenizer.tokenize(text)
        if not ids:
            raise ValueError(f"option {text!r} has no tokens")
        if positions(prefix) + len(ids) > cache.n_ctx:
            raise PromptTooLong(f"the prompt and option need {positions(prefix) + len(ids)} tokens, more than the "
                                f"context of {cache.n_ctx}; raise --ctx")
        first, _ = cache.sync(prefix)  # [1, vocab]: predicts ids[0]
        rows = first[-1:] if len(ids) == 1 else np.concatenate([first[-1:], cache.eval(ids[:-1], all_logits=True)])
        logp = log_softmax(rows)  # [len(ids), vocab]
        out.append((float(logp[np.arange(len(ids)), ids].sum()), len(ids)))
    return out


def best(scores: Sequence[float], letters: Sequence[str]) -> str:
    """The letter of the highest score; ties go to the earlier letter."""
    return letters[int(np.argmax(np.asarray(scores, dtype=np.float64)))]


_EXPLICIT = re.compile(r"(?i:final\s+answer|answer|option)\s*(?i:is|:|=)?\s*[\(\[\*]*\s*([A-Z])\b")
_LEADING = re.compile(r"^[\s\*\(\[]*([A-Z])(?:$|[.):\]\*,]|\s)")
_WORDS = re.compile(r"^[\s\*\(\[]*(?:A|I)\s+[a-z]")  # "A pneumothorax...", "I think...": words, not letters


def extract_letter(answer: str, letters: Sequence[str], options: Sequence[tuple[str, str]] = ()) -> str | None:
    """The option letter a generated answer chose, by the rule in the module docstring; None when it chose none."""
    valid = set(letters)
    explicit = [m.group(1) for m in _EXPLICIT.finditer(answer) if m.group(1) in valid]
    if explicit:
        return explicit[-1]
    m = _LEADING.match(answer)
    if m and m.group(1) in valid and not _WORDS.match(answer):
        return m.group(1)
    said = f" {normalise(answer)} "
    found = [letter for letter, text in options if normalise(text) and f" {normalise(text)} " in said]
    return found[0] if len(found) == 1 else None


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    """NFKC, lower case, punctuation dropped, articles dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") or c in string.punctuation else c for c in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, reference: str) -> bool:
    return answer.strip() == reference.strip()


def normalised_match(answer: str, reference: str) -> bool:
    return normalise(answer) == normalise(reference)
