"""What the caller's logit bias and the answer so far do to one logits row, before a token is drawn.

Pure numpy, in place on a float32 row [vocab]. The MedGemma 27B newline loops people report on vLLM
are what the penalties are for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medgemma_edge.errors import UserError
from medgemma_edge.runtime.sampling import BAN, SamplingParams


class LogitBias:
    """Fixed additions per token id; a bias of -100 (or less) bans the token outright (-inf)."""

    def __init__(self, bias: Sequence[tuple[int, float]], n_logits: int) -> None:
        for token, _ in bias:
            if token >= n_logits:
                raise UserError(f"logit_bias: token id {token} is outside this model's vocabulary "
                                f"(ids 0 to {n_logits - 1}); give an id the model has")
        add = [(t, b) for t, b in bias if b > BAN]
        self._ids = np.array([t for t, _ in add], dtype=np.int64)
        self._add = np.array([b for _, b in add], dtype=np.float32)
        self._ban = np.array([t for t, b in bias if b <= BAN], dtype=np.int64)

    @property
    def active(self) -> bool:
        return bool(self._ids.size or self._ban.size)

    def apply(self, row: np.ndarray) -> None:
        row[self._ids] += self._add
        row[self._ban] = -np.inf


class Penalties:
    """Repetition penalty over the prompt and the answer; presence and frequency over the answer only.

    ref: CTRL's repetition penalty (divide positive logits, multiply negative ones), as transformers'
    RepetitionPenaltyLogitsProcessor and vLLM apply it; OpenAI's presence/frequency penalties
    (logit - presence * [count > 0] - frequency * count).
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], n_logits: int) -> None:
        self.repetition = params.repetition_penalty
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty
        self._n = n_logits
        self._seen = np.zeros(n_logits, dtype=bool)  # prompt or answer: what the repetition penalty hits
        if self.repetition != 1.0:
            prompt = np.asarray(prompt_ids, dtype=np.int64)
            self._seen[prompt[(prompt >= 0) & (prompt < n_logits)]] = True
        self._seen_ids = np.flatnonzero(self._seen)
        self._counts = np.zeros(n_logits, dtype=np.float32)  # occurrences in the answer
        self._answer_ids = np.zeros(0, dtype=np.int64)

    @property
    def active(self) -> bool:
        return self.repetition != 1.0 or self.presence != 0.0 or self.frequency != 0.0

    def accept(self, token: int) -> None:
        """Count a token that joined the answer."""
        if not 0 <= token < self._n:
            return
        if self._counts[token] == 0:
            self._answer_ids = np.append(self._answer_ids, token)
        self._counts[token] += 1
        if not self._seen[token]:
            self._seen[token] = True
            self._seen_ids = np.append(self._seen_ids, token)

    def apply(self, row: np.ndarray) -> None:
        if self.repetition != 1.0 and self._seen_ids.size:
            x = row[self._seen_ids]
            row[self._seen_ids] = np.where(x > 0, x / self.repetition, x * self.repetition)
        if (self.presence or self.frequency) and self._answer_ids.size:
            ids = self._answer_ids
            row[ids] -= self.presence + self.frequency * self._counts[ids]
