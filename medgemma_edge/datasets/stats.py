"""The two small statistics of `eval`, written out so they can be checked by hand.

- Wilson score interval for a proportion k/n (ref: Wilson 1927; Agresti & Coull 1998): with p = k/n and z the
  normal quantile, centre = (p + z^2/2n) / (1 + z^2/n), half-width = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
  It stays inside [0, 1] and behaves at 0/n and n/n, where the normal (Wald) interval collapses.
- McNemar's test for two scorers on the same items (ref: McNemar 1947): only discordant items count,
  b = the reference right and the other wrong, c = the reverse. Under "same accuracy" each discordant item is a
  fair coin, so the exact two-sided p-value is min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)]); no
  chi-square approximation, so it holds for the small counts of a first validation set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

Z95 = 1.959963984540054  # the 97.5% normal quantile


@dataclass(frozen=True)
class Proportion:
    k: int
    n: int
    low: float
    high: float

    @property
    def p(self) -> float:
        return self.k / self.n if self.n else float("nan")


def wilson(k: int, n: int, z: float = Z95) -> Proportion:
    """k successes out of n with its Wilson interval (n = 0: nan bounds)."""
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must lie in 0..n={n}")
    if n == 0:
        return Proportion(0, 0, float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Proportion(k, n, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class McNemar:
    b: int  # the reference right, the other wrong
    c: int  # the reference wrong, the other right
    p_value: float

    @property
    def discordant(self) -> int:
        return self.b + self.c


def mcnemar(reference: list[bool], other: list[bool]) -> McNemar:
    """Exact McNemar test of two paired lists of correctness (same items, same order)."""
    if len(reference) != len(other):
        raise ValueError("paired lists must have the same length")
    b = sum(1 for r, o in zip(reference, other) if r and not o)
    c = sum(1 for r, o in zip(reference, other) if o and not r)
    return McNemar(b, c, exact_binomial_two_sided(min(b, c), b + c))


def exact_binomial_two_sided(k: int, n: int) -> float:
    """min(1, 2 * P[X <= k]) for X ~ Binomial(n, 1/2), in exact integer arithmetic (n may be large)."""
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))
