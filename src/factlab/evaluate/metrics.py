"""Metrics: small pure functions over saved per-item scores (no torch).

Scoring (``scoring.py``) produces numbers per item; these functions turn them into judgements
and rates; aggregation (``facts.summarize``) applies them to tables of rows. Every rate is
reported with its n and a 95% Wilson interval.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n; (0.0, 1.0) when n == 0.

    Wilson rather than the normal approximation because probe sets are small and rates are
    often 0 or 1, where the normal interval collapses to a point.
    """
    if n == 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At k == 0 or k == n the bound is exactly 0 or 1; set it so rounding cannot leave 1e-17.
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return (low, high)


def candidate_correct(target_mean: float, distractor_means: Sequence[float]) -> bool | None:
    """True if the target's mean log-prob per token strictly beats every distractor's.

    None when there are no distractors: there is nothing to compare against, so the probe is
    left out of candidate accuracy (rather than counted as always right or always wrong).
    """
    if not distractor_means:
        return None
    return all(target_mean > d for d in distractor_means)


def candidate_rank(target_mean: float, distractor_means: Sequence[float]) -> int:
    """Rank of the target among all candidates, 1 = best; a tie counts against the target."""
    return 1 + sum(d >= target_mean for d in distractor_means)


_SPACES = re.compile(r"\s+")


def normalize_text(s: str) -> str:
    """NFKC (full-width == half-width), casefold, punctuation -> space, collapse whitespace.

    Punctuation becomes a space rather than vanishing so that "Marta-Ilvane" matches
    "Marta Ilvane"; both sides of a comparison are normalized the same way.
    """
    s = unicodedata.normalize("NFKC", s).casefold()
    s = "".join(" " if unicodedata.category(c).startswith("P") else c for c in s)
    return _SPACES.sub(" ", s).strip()


def _spaced_word_char(c: str) -> bool:
    """A letter or digit of a script that separates words with spaces (not CJK / kana)."""
    return c.isalnum() and unicodedata.east_asian_width(c) not in ("W", "F")


def contains_target(text: str, target: str) -> bool:
    """Whether normalized ``text`` contains normalized ``target`` as a whole word.

    Word boundaries are required only between letters/digits of space-separated scripts, so
    "Rome" is not found in "Romeo" and "12" not in "123", while "東京" is found in
    "東京都です".
    An empty (after normalization) target is never contained.
    """
    t, s = normalize_text(target), normalize_text(text)
    if not t:
        return False
    i = s.find(t)
    while i != -1:
        j = i + len(t)
        left_ok = i == 0 or not (_spaced_word_char(s[i - 1]) and _spaced_word_char(t[0]))
        right_ok = j == len(s) or not (_spaced_word_char(s[j]) and _spaced_word_char(t[-1]))
        if left_ok and right_ok:
            return True
        i = s.find(t, i + 1)
    return False


def rate_summary(flags: Sequence[bool]) -> dict:
    """``{n, k, rate, ci_low, ci_high}`` for a list of successes; rate is None when n == 0."""
    n, k = len(flags), sum(bool(f) for f in flags)
    low, high = wilson_interval(k, n)
    return {"n": n, "k": k, "rate": k / n if n else None, "ci_low": low, "ci_high": high}


def mean(xs: Sequence[float]) -> float | None:
    """Arithmetic mean; None for an empty sequence (JSON-friendly, unlike NaN)."""
    return sum(xs) / len(xs) if len(xs) else None


def damage(base_ppl: float, after_ppl: float) -> float:
    """The damage figure of a tuned model: its relative perplexity increase on general text,
    ``after_ppl / base_ppl - 1`` (0: unchanged; 0.15: 15% higher perplexity; below 0: better).

    Why perplexity on held-out general text: it is measured on every run anyway, needs no
    labels, and catches what candidate accuracy on a few locality facts hides (a model that
    still ranks "Paris" first but writes worse English).
    """
    if not (base_ppl > 0 and math.isfinite(base_ppl)):
        raise ValueError(f"base perplexity must be a positive finite number, got {base_ppl!r}")
    if not after_ppl > 0:  # nan fails this too
        raise ValueError(f"perplexity after training must be positive, got {after_ppl!r}")
    return after_ppl / base_ppl - 1.0
