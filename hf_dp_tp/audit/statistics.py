"""The one-run lower bound on ε (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023).

The game: ``m`` canaries, each included in the training data independently with probability
1/2 (``S_j = ±1``); one training run; the auditor looks at the output and makes ``r`` guesses
``T_j ∈ {+1, −1}`` (abstaining on the other ``m − r``); ``W`` is the number of correct guesses.

Their main theorem: if training is (ε, δ)-DP with respect to each canary, then for every ``v``

    P[W ≥ v] ≤ f(v) + 2 m δ · max_{1 ≤ i ≤ v} (f(v − i) − f(v)) / i,
    f(u) = P[Binomial(r, p_ε) ≥ u],   p_ε = e^ε / (1 + e^ε).

(``f(v − i) − f(v) = P[v − i ≤ Binomial(r, p_ε) < v]``; indices ``i > v`` give smaller terms.)
With δ = 0 this is the binomial tail of ε-DP randomized response: no ε-DP run lets a guesser do
better than ``r`` independent coin flips of bias ``p_ε``.

Reading it as a test: the right-hand side, evaluated at the observed ``v``, is a p-value for the
hypothesis "training is (ε, δ)-DP". If it is at most β, that hypothesis is rejected at confidence
``1 − β``. Since (ε, δ)-DP implies (ε', δ)-DP for every ε' ≥ ε, rejecting ε rejects every
smaller ε as well, so *any* rejected ε is a lower bound; :func:`epsilon_lower_bound` returns the
largest one it finds by bisection, keeping the invariant "the returned ε was rejected" (it never
returns an ε whose p-value it has not checked to be ≤ β).

Choosing the number of guesses after seeing the scores would void the p-value; the audit fixes a
short list of guess counts in advance and splits β over them (Bonferroni):
:func:`best_bound_over_guess_counts`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AuditBound",
    "best_bound_over_guess_counts",
    "correct_guesses",
    "epsilon_lower_bound",
    "guesses_from_scores",
    "p_value",
]

#: ε above which the bisection stops looking (p_ε is then 1 − 4e-44 in float64).
EPSILON_CAP = 100.0


def _check_counts(m: int, r: int, v: int) -> None:
    if not (isinstance(m, int | np.integer) and isinstance(r, int | np.integer)):
        raise TypeError("m and r must be integers")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on ``P[W ≥ v]`` for an (ε, δ)-DP run with ``m`` canaries and ``r`` guesses:
    the p-value of "this run is (ε, δ)-DP" after observing ``v`` correct guesses (capped at 1)."""
    from scipy.stats import binom

    _check_counts(m, r, v)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(binom.sf(v - 1, r, p))  # f(v) = P[Bin ≥ v]
    if delta == 0:
        return min(1.0, tail)
    # P[v − i ≤ Bin < v] for i = 1..v: cumulative sums of the pmf going down from v − 1
    below = binom.pmf(np.arange(v - 1, -1, -1), r, p)
    window = np.cumsum(below)
    alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(
    m: int,
    r: int,
    v: int,
    *,
    delta: float,
    confidence: float = 0.95,
    tolerance: float = 1e-4,
) -> float:
    """The largest ε (to ``tolerance``, rounded down) that ``v`` correct out of ``r`` guesses on
    ``m`` canaries rejects at ``confidence``: with that confidence the run is not (ε, δ)-DP for
    any smaller ε. 0 when not even ε = 0 is rejected."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    _check_counts(m, r, v)
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    low, high = 0.0, 1.0  # invariant: p_value(low) <= beta (rejected)
    while p_value(m, r, v, high, delta) <= beta:
        low, high = high, 2.0 * high
        if high > EPSILON_CAP:
            return low
    while high - low > tolerance:
        mid = 0.5 * (low + high)
        if p_value(m, r, v, mid, delta) <= beta:
            low = mid
        else:
            high = mid
    return low


def guesses_from_scores(scores: Sequence[float] | np.ndarray, k_in: int, k_out: int) -> np.ndarray:
    """``+1`` ("in") for the ``k_in`` highest scores, ``−1`` ("out") for the ``k_out`` lowest,
    ``0`` (abstain) for the rest. Ties are broken by canary index (a fixed rule, decided before
    the run)."""
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.shape[0]
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise ValueError(f"need k_in, k_out >= 0 and k_in + k_out <= m ({m})")
    order = np.argsort(scores, kind="stable")  # ascending
    guesses = np.zeros(m, dtype=np.int8)
    if k_out:
        guesses[order[:k_out]] = -1
    if k_in:
        guesses[order[m - k_in :]] = 1
    return guesses


def correct_guesses(guesses: np.ndarray, included: Sequence[bool] | np.ndarray) -> int:
    """Number of guesses that match the truth (``+1`` on an included canary, ``−1`` on one left
    out); abstentions count for nothing."""
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    guesses = np.asarray(guesses)
    return int(np.sum((guesses != 0) & (guesses == truth)))


@dataclass(frozen=True)
class AuditBound:
    """One audit's result: the bound and the counts it came from."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    guesses: int
    guesses_in: int
    guesses_out: int
    correct: int
    #: how many guess counts were tried (β was split over them)
    candidates: int


def default_guess_counts(m: int) -> list[int]:
    """Total guess counts tried by default: 5 %, 10 %, 20 % and 40 % of the canaries (half
    guessed "in", half "out"), fixed before the run."""
    counts = sorted({max(2, 2 * round(fraction * m / 2)) for fraction in (0.05, 0.1, 0.2, 0.4)})
    return [c for c in counts if c <= m] or [m - m % 2]


def best_bound_over_guess_counts(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[int] | None = None,
) -> AuditBound:
    """The best lower bound over a list of total guess counts fixed in advance (half "in" on the
    highest scores, half "out" on the lowest), each tested at ``β / len(guess_counts)`` so that
    the reported bound holds at ``confidence`` (Bonferroni)."""
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.shape[0]
    if np.asarray(included).shape[0] != m:
        raise ValueError("scores and included must have the same length")
    counts = list(guess_counts) if guess_counts is not None else default_guess_counts(m)
    if not counts:
        raise ValueError("give at least one guess count")
    beta = (1.0 - confidence) / len(counts)
    best: AuditBound | None = None
    for r in counts:
        if not 0 < r <= m:
            raise ValueError(f"a guess count must be in [1, {m}], got {r}")
        k_in = r // 2
        k_out = r - k_in
        guesses = guesses_from_scores(scores, k_in, k_out)
        v = correct_guesses(guesses, included)
        bound = epsilon_lower_bound(m, r, v, delta=delta, confidence=1.0 - beta)
        result = AuditBound(
            epsilon_lower_bound=bound,
            confidence=confidence,
            delta=delta,
            canaries=m,
            guesses=r,
            guesses_in=k_in,
            guesses_out=k_out,
            correct=v,
            candidates=len(counts),
        )
        if best is None or bound > best.epsilon_lower_bound:
            best = result
    assert best is not None
    return best
