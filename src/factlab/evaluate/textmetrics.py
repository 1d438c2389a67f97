"""Text metrics for answers: ROUGE-L, BLEU, n-gram repetition, diversity, EOS and length summaries.

Pure functions over saved answers (no torch), like ``metrics.py``; rates reuse
``metrics.rate_summary`` (Wilson interval) and means get a seeded percentile-bootstrap interval.

Tokenization, one definition per use:

- ``text_tokens`` (ROUGE-L and BLEU): NFKC, case-folded, punctuation dropped; runs of
  letters/digits are words, and each CJK / kana / hangul character is a token of its own.
  On ASCII text this equals rouge_score's default tokenizer; unlike it, it keeps non-ASCII
  letters ("café") and does not drop Japanese or Chinese text.
- ``prefix_tokens`` (repetition, diversity, length): whitespace words as written (case and
  punctuation kept, as in the SimCTG / NEFTune repetition code), or, for text containing
  CJK / kana / hangul, its non-space characters.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from factlab.evaluate.metrics import mean, normalize_text, rate_summary

# log_diversity is -log(1 - diversity); 1 - diversity is floored at exp(-20), so 20 is the
# value for text without any repeated n-gram (the cap used by the reference implementation).
LOG_DIVERSITY_MAX = 20.0


def bootstrap_mean_interval(
    xs: Sequence[float], n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """``{n, mean, ci_low, ci_high}``: the mean and its percentile-bootstrap interval.

    Resamples ``xs`` with replacement ``n_resamples`` times (numpy ``default_rng(seed)``, so
    the interval is reproducible) and takes the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of the resampled means (numpy's default linear interpolation).
    n == 0: mean and both ends None. n == 1: the value is the mean and both ends.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    n = len(xs)
    m = mean(xs)
    if n == 0:
        return {"n": 0, "mean": None, "ci_low": None, "ci_high": None}
    if n == 1:
        return {"n": 1, "mean": float(m), "ci_low": float(m), "ci_high": float(m)}
    values = np.asarray(xs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))  # (R, n) resample indices
    means = values[idx].mean(axis=1)  # (R,)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    # Clamp to [min, max] of the data: resampled means cannot leave it, but float rounding
    # can (constant data must give an interval of exactly that constant).
    low, high = (float(np.clip(q, values.min(), values.max())) for q in (low, high))
    return {"n": n, "mean": float(m), "ci_low": low, "ci_high": high}


def _is_wide_char(c: str) -> bool:
    """A letter/digit of a script written without spaces between words in the CJK sense.

    East Asian Wide / Fullwidth letters: CJK ideographs, kana, hangul. (Fullwidth Latin is
    also F, but NFKC has turned it into ASCII before this is asked in ``text_tokens``.)
    """
    return c.isalnum() and unicodedata.east_asian_width(c) in ("W", "F")


def _is_word_char(c: str) -> bool:
    # Combining marks (category M) belong to their word: Devanagari vowel signs, etc.
    return c.isalnum() or unicodedata.category(c).startswith("M")


def text_tokens(text: str) -> list[str]:
    """Tokens for ROUGE-L and BLEU: normalized words, with CJK / kana / hangul one per character.

    ``metrics.normalize_text`` (NFKC, casefold, punctuation -> space), then runs of letters,
    digits and combining marks are words and every other character (spaces, symbols such as
    ``$`` or ``+``) separates them, except that a wide character is always its own token.
    Examples: ``"Don't stop!" -> ["don", "t", "stop"]``, ``"東京都です" -> ["東", "京", "都",
    "で", "す"]``, ``"Tokyo は大きい" -> ["tokyo", "は", "大", "き", "い"]``. Scripts without
    spaces that are not wide (Thai, Khmer, ...) are not segmented: a run is one token.
    """
    tokens: list[str] = []
    word: list[str] = []
    for c in normalize_text(text):
        if _is_wide_char(c):
            if word:
                tokens.append("".join(word))
                word = []
            tokens.append(c)
        elif _is_word_char(c):
            word.append(c)
        elif word:
            tokens.append("".join(word))
            word = []
    if word:
        tokens.append("".join(word))
    return tokens


@lru_cache(maxsize=1)
def _rouge_scorer():
    # Imported lazily: rouge_score imports nltk, which is slow to import.
    from rouge_score import rouge_scorer, tokenizers

    class _TextTokens(tokenizers.Tokenizer):
        def tokenize(self, text):
            return text_tokens(text)

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_TextTokens())


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure of ``prediction`` against the best of ``references``, in [0, 1].

    Computed by the ``rouge_score`` package (``RougeScorer(["rougeL"])``, no stemming) over
    ``text_tokens``: F = 2PR / (P + R) with P = LCS / len(prediction), R = LCS / len(reference),
    and the maximum F over the references is returned. rouge_score's default tokenizer keeps
    only ``[a-z0-9]`` and would score any Japanese text 0, hence ``text_tokens``, which splits
    CJK / kana into characters (the usual character-level ROUGE for those scripts).
    Empty prediction or reference (no tokens): 0.0.
    """
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _rouge_scorer()
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def _bleu_text(text: str) -> str:
    return " ".join(text_tokens(text))


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) via ``sacrebleu``; ``references[i]`` are the references of prediction i.

    Predictions may have different numbers of references. The text is pre-tokenized with
    ``text_tokens`` (the same tokens ROUGE-L sees, so Japanese is compared per character) and
    passed to sacrebleu with ``tokenize="none"``; hence the score is case-insensitive and
    ignores punctuation, and is not comparable to a published sacreBLEU "13a" number.
    Otherwise sacrebleu's defaults: 4-grams, brevity penalty, ``smooth_method="exp"``.
    """
    from sacrebleu.metrics import BLEU

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("bleu needs at least one prediction")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every prediction needs at least one reference")
    # sacrebleu wants reference *streams*: stream j holds the j-th reference of every
    # prediction, None where a prediction has fewer references.
    n_streams = max(len(refs) for refs in references)
    streams = [[_bleu_text(refs[j]) if j < len(refs) else None for refs in references] for j in range(n_streams)]
    hyps = [_bleu_text(p) for p in predictions]
    return float(BLEU(tokenize="none").corpus_score(hyps, streams).score)


def sentence_bleu(prediction: str, references: Sequence[str]) -> float:
    """Sentence BLEU (0-100) of one prediction, tokenized as in ``bleu``.

    sacrebleu's sentence defaults: ``smooth_method="exp"`` and effective order (n-gram orders
    longer than the prediction are left out), so short answers do not collapse to 0.
    """
    from sacrebleu.metrics import BLEU

    if not references:
        raise ValueError("sentence_bleu needs at least one reference")
    scorer = BLEU(tokenize="none", effective_order=True)
    return float(scorer.sentence_score(_bleu_text(prediction), [_bleu_text(r) for r in references]).score)


def ngram_repetition(tokens: Sequence, n: int) -> float:
    """rep-n = 1 - unique n-grams / total n-grams of one sequence; 0.0 if shorter than n.

    The repetition measure of SimCTG (Su et al. 2022, "A Contrastive Framework for Neural
    Text Generation") reported by NEFTune (Jain et al. 2023). Counted over all
    ``len(tokens) - n + 1`` n-grams; the reference code (SimCTG's ``eval_text``, copied into
    lm-watermarking's ``repetition_diversity.py``) stops one n-gram early, which we do not.
    Example: "a b a b a b", n=2: 5 bigrams, 2 distinct -> 1 - 2/5 = 0.6.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    unique = len({tuple(tokens[i : i + n]) for i in range(total)})
    return 1.0 - unique / total


def diversity(tokens: Sequence, ns: Sequence[int] = (2, 3, 4)) -> float:
    """SimCTG diversity = prod over n in ``ns`` of (1 - rep-n), in [0, 1]; 1 = no repeats."""
    return math.prod(1.0 - ngram_repetition(tokens, n) for n in ns)


def log_diversity(tokens: Sequence, ns: Sequence[int] = (2, 3, 4)) -> float:
    """Log-diversity as in NEFTune: ``-log(max(1 - diversity(tokens), exp(-20)))``, in [0, 20].

    NEFTune (Jain et al. 2023, arXiv:2310.05914) reports the log-diversity of Kirchenbauer et
    al. 2023 ("On the Reliability of Watermarks for Large Language Models"), whose code
    (lm-watermarking, ``watermark_reliability_release/metrics/repetition_diversity.py``)
    computes ``-log(max(1 - d, exp(-20)))`` with d the SimCTG diversity over n = 2, 3, 4.
    Higher = more diverse; 20 (the cap, which also guards log(0)) = no repeated n-gram at all,
    including text too short to have any n-gram; near 0 = highly repetitive ("a a a a a":
    -log(23/24) = 0.043). The scale is steep near the cap: one repeated bigram in 50 words
    already gives about 3.9.
    Note: that code divides fractional rep-n by 100 a second time (so its d is close to 1
    and its numbers are larger than ours); we use rep-n as fractions throughout.
    """
    d = diversity(tokens, ns)
    return -math.log(max(1.0 - d, math.exp(-LOG_DIVERSITY_MAX)))


def _style_tokens(text: str) -> list[str]:
    if any(_is_wide_char(c) for c in text):
        return [c for c in text if not c.isspace()]
    return text.split()


def prefix_tokens(text: str, k: int) -> list[str]:
    """The first ``k`` tokens of an answer, so long and short answers are compared on equal length.

    Tokens are whitespace-separated words as written (case and punctuation kept); for text
    containing any CJK / kana / hangul character, its non-whitespace characters.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return _style_tokens(text)[:k]


def _join_tokens(tokens: Sequence[str], text: str) -> str:
    # Back to a string for ROUGE / BLEU: characters of CJK text are joined without spaces.
    sep = "" if any(_is_wide_char(c) for c in text) else " "
    return sep.join(tokens)


def eos_summary(ended_with_eos: Sequence[bool], lengths: Sequence[int]) -> dict:
    """Chat-format summary: ``{"eos": rate_summary, "length": bootstrap_mean_interval}``.

    ``ended_with_eos[i]``: answer i ended with EOS within the token budget;
    ``lengths[i]``: its length in tokens (as counted by the generator).
    """
    if len(ended_with_eos) != len(lengths):
        raise ValueError(f"{len(ended_with_eos)} EOS flags but {len(lengths)} lengths")
    return {"eos": rate_summary(ended_with_eos), "length": bootstrap_mean_interval(lengths)}


def style_summary(answers: Sequence[str], references: Sequence[Sequence[str]], prefix_len: int = 50) -> dict:
    """Style of answers against reference answers (e.g. the SFT training answers).

    Each answer is cut to ``prefix_tokens(answer, prefix_len)``; the references are used
    whole. Per answer: ROUGE-L (best reference), rep-2/3/4, diversity and log-diversity of
    the prefix tokens, and the full answer's length in the same tokens; each reported as a
    bootstrap mean interval. BLEU is corpus BLEU of the prefixes (a single number; None when
    there are no answers).

    Returns ``{n, prefix_len, rouge_l, bleu, rep_2, rep_3, rep_4, diversity, log_diversity,
    length}``.
    """
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} reference lists")
    prefixes = [prefix_tokens(a, prefix_len) for a in answers]
    texts = [_join_tokens(p, a) for p, a in zip(prefixes, answers)]
    return {
        "n": len(answers),
        "prefix_len": prefix_len,
        "rouge_l": bootstrap_mean_interval([rouge_l(t, refs) for t, refs in zip(texts, references)]),
        "bleu": bleu(texts, references) if answers else None,
        **{f"rep_{n}": bootstrap_mean_interval([ngram_repetition(p, n) for p in prefixes]) for n in (2, 3, 4)},
        "diversity": bootstrap_mean_interval([diversity(p) for p in prefixes]),
        "log_diversity": bootstrap_mean_interval([log_diversity(p) for p in prefixes]),
        "length": bootstrap_mean_interval([len(_style_tokens(a)) for a in answers]),
    }
