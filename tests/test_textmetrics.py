"""Text metrics (pure functions): exact, hand-computed values."""

from __future__ import annotations

import math

import pytest

from factlab.evaluate.metrics import wilson_interval
from factlab.evaluate.textmetrics import (
    LOG_DIVERSITY_MAX,
    bleu,
    bootstrap_mean_interval,
    diversity,
    eos_summary,
    log_diversity,
    ngram_repetition,
    prefix_tokens,
    rouge_l,
    sentence_bleu,
    style_summary,
    text_tokens,
)


# --- bootstrap ---------------------------------------------------------------------------


def test_bootstrap_deterministic_and_covers_mean():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    a = bootstrap_mean_interval(xs, seed=0)
    assert a == bootstrap_mean_interval(xs, seed=0)  # same seed, same interval, exactly
    assert a["n"] == 5 and a["mean"] == 3.0
    assert a["ci_low"] < 3.0 < a["ci_high"]
    # Normal approximation: sd of the mean = sqrt(var_pop / n) = sqrt(2 / 5) = 0.632,
    # so the 95% interval is about 3 -+ 1.24; 2000 resamples land close to it.
    assert a["ci_low"] == pytest.approx(3 - 1.96 * math.sqrt(2 / 5), abs=0.15)
    assert a["ci_high"] == pytest.approx(3 + 1.96 * math.sqrt(2 / 5), abs=0.15)
    wide = bootstrap_mean_interval(xs, level=0.99)
    narrow = bootstrap_mean_interval(xs, level=0.80)
    assert wide["ci_low"] <= a["ci_low"] <= narrow["ci_low"]
    assert narrow["ci_high"] <= a["ci_high"] <= wide["ci_high"]


def test_bootstrap_edge_cases():
    assert bootstrap_mean_interval([]) == {"n": 0, "mean": None, "ci_low": None, "ci_high": None}
    assert bootstrap_mean_interval([7.5]) == {"n": 1, "mean": 7.5, "ci_low": 7.5, "ci_high": 7.5}
    same = bootstrap_mean_interval([0.1, 0.1, 0.1])
    assert same["ci_low"] == same["ci_high"] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        bootstrap_mean_interval([1.0, 2.0], level=1.0)


# --- tokens, ROUGE-L, BLEU ---------------------------------------------------------------


def test_text_tokens_match_rouge_default_on_ascii_and_keep_other_scripts():
    from rouge_score import tokenize

    for s in ["Don't stop! The 3rd item costs $5.99+tax", "A_b c-d e/f", "Hello\tWorld\n", ""]:
        assert text_tokens(s) == tokenize.tokenize(s, None)
    assert text_tokens("東京都です。") == ["東", "京", "都", "で", "す"]
    assert text_tokens("Tokyo は大きい café") == ["tokyo", "は", "大", "き", "い", "café"]
    assert text_tokens("ＡＢＣ１２") == ["abc12"]  # full-width Latin is NFKC-folded, not split


def test_rouge_l_hand_computed():
    # pred "the cat sat on the mat" (6), ref "the cat on mat" (4): LCS = "the cat on mat" = 4
    # P = 4/6, R = 4/4, F = 2PR/(P+R) = (4/3) / (5/3) = 0.8
    assert rouge_l("The cat sat on the mat.", ["the cat on mat"]) == pytest.approx(0.8)
    # best of the references; a disjoint one scores 0
    assert rouge_l("the cat sat on the mat", ["dog", "the cat on mat"]) == pytest.approx(0.8)
    assert rouge_l("a b c", ["x y z"]) == 0.0
    assert rouge_l("", ["x y z"]) == 0.0
    # LCS is a subsequence, not a substring: "a b c d" vs "a x c y d": LCS = a c d = 3
    # P = 3/4, R = 3/5, F = 2 * 0.45 / 1.35 = 2/3
    assert rouge_l("a b c d", ["a x c y d"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        rouge_l("a", [])


def test_rouge_l_japanese_is_character_level():
    from rouge_score import rouge_scorer

    # The package default drops all non-ASCII text: Japanese would always score 0.
    default = rouge_scorer.RougeScorer(["rougeL"]).score("東京です", "東京都です")["rougeL"].fmeasure
    assert default == 0.0
    # pred 東京都です (5 chars), ref 東京です (4): LCS = 東京です = 4
    # P = 4/5, R = 1, F = 2 * 0.8 / 1.8 = 8/9
    assert rouge_l("東京都です", ["東京です"]) == pytest.approx(8 / 9)
    assert rouge_l("東京都です。", ["東京都です"]) == pytest.approx(1.0)  # punctuation ignored


def test_bleu_identical_and_disjoint():
    refs = [["the cat sat on the mat"], ["a dog ran in the park today"]]
    assert bleu(["the cat sat on the mat", "a dog ran in the park today"], refs) == pytest.approx(100.0)
    assert bleu(["one two three four", "five six seven eight"], refs) == 0.0
    # predictions may have different numbers of references; the matching one counts
    assert bleu(["the cat sat on the mat", "x y z w"], [["q r s t", "the cat sat on the mat"], ["x y z w"]]) == pytest.approx(100.0)
    assert bleu(["東京都に住んでいます"], [["東京都に住んでいます"]]) == pytest.approx(100.0)
    assert 0.0 < bleu(["東京に住んでいます"], [["東京都に住んでいます"]]) < 100.0
    assert sentence_bleu("The cat sat on the mat.", ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert sentence_bleu("one two three", ["the cat sat on the mat"]) == 0.0
    with pytest.raises(ValueError):
        bleu(["a"], [[]])
    with pytest.raises(ValueError):
        bleu(["a", "b"], [["a"]])


# --- repetition and diversity ------------------------------------------------------------


def test_ngram_repetition_hand_computed():
    toks = "a b a b a b".split()
    assert ngram_repetition(toks, 2) == pytest.approx(1 - 2 / 5)  # ab ba ab ba ab
    assert ngram_repetition(toks, 3) == pytest.approx(1 - 2 / 4)  # aba bab aba bab
    assert ngram_repetition(toks, 4) == pytest.approx(1 - 2 / 3)  # abab baba abab
    assert ngram_repetition("a a a a a".split(), 2) == pytest.approx(1 - 1 / 4)
    assert ngram_repetition("a b c d".split(), 2) == 0.0
    assert ngram_repetition(["a"], 2) == 0.0 and ngram_repetition([], 1) == 0.0
    assert ngram_repetition([1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 3)  # token ids work too


def test_diversity_and_log_diversity_hand_computed():
    toks = "a b a b a b".split()
    d = (1 - 0.6) * (1 - 0.5) * (1 - 1 / 3)  # = 0.4 * 0.5 * 2/3 = 2/15
    assert diversity(toks) == pytest.approx(2 / 15)
    assert log_diversity(toks) == pytest.approx(-math.log(1 - d))
    assert log_diversity(toks) == pytest.approx(-math.log(13 / 15))
    # "a a a a a": rep-2 3/4, rep-3 2/3, rep-4 1/2 -> d = 1/4 * 1/3 * 1/2 = 1/24
    assert log_diversity("a a a a a".split()) == pytest.approx(-math.log(23 / 24))
    # no repeated n-gram: diversity 1, log(0) guarded by the cap
    assert diversity("a b c d e".split()) == 1.0
    assert log_diversity("a b c d e".split()) == LOG_DIVERSITY_MAX == 20.0
    assert log_diversity([]) == 20.0
    assert diversity(toks, ns=(2,)) == pytest.approx(0.4)


def test_prefix_tokens():
    assert prefix_tokens("One two,  three\nfour", 3) == ["One", "two,", "three"]
    assert prefix_tokens("short", 10) == ["short"]
    assert prefix_tokens("東京 です。", 3) == ["東", "京", "で"]
    assert prefix_tokens("東京です。", 10) == ["東", "京", "で", "す", "。"]
    assert prefix_tokens("a b", 0) == [] and prefix_tokens("", 5) == []


# --- summaries ---------------------------------------------------------------------------


def test_eos_summary():
    s = eos_summary([True, True, False, True], [10, 20, 30, 40])
    low, high = wilson_interval(3, 4)
    assert s["eos"] == {"n": 4, "k": 3, "rate": 0.75, "ci_low": low, "ci_high": high}
    assert s["length"]["n"] == 4 and s["length"]["mean"] == 25.0
    assert 10 <= s["length"]["ci_low"] < 25.0 < s["length"]["ci_high"] <= 40
    empty = eos_summary([], [])
    assert empty["eos"]["rate"] is None and empty["length"]["mean"] is None
    with pytest.raises(ValueError):
        eos_summary([True], [1, 2])


def test_style_summary_hand_computed():
    answers = ["a b a b a b", "the cat sat"]
    refs = [["a b a b a b"], ["the cat sat on the mat"]]
    s = style_summary(answers, refs, prefix_len=4)
    assert s["n"] == 2 and s["prefix_len"] == 4
    # prefixes "a b a b" and "the cat sat"
    #   ROUGE-L: LCS 4, P 1, R 4/6 -> F 0.8;  LCS 3, P 1, R 3/6 -> F 2/3
    assert s["rouge_l"]["mean"] == pytest.approx((0.8 + 2 / 3) / 2)
    #   rep-2: ab ba ab -> 1 - 2/3;  no repeats -> 0
    assert s["rep_2"]["mean"] == pytest.approx((1 / 3) / 2)
    #   rep-3: aba bab -> 0;  rep-4: one 4-gram -> 0
    assert s["rep_3"]["mean"] == 0.0 and s["rep_4"]["mean"] == 0.0
    assert s["diversity"]["mean"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["log_diversity"]["mean"] == pytest.approx((-math.log(1 / 3) + 20.0) / 2)
    #   length of the whole answers: 6 and 3 words
    assert s["length"]["mean"] == 4.5
    assert s["bleu"] == pytest.approx(bleu(["a b a b", "the cat sat"], refs))
    empty = style_summary([], [])
    assert empty["n"] == 0 and empty["bleu"] is None and empty["rouge_l"]["mean"] is None


def test_style_summary_japanese_prefix():
    s = style_summary(["東京都です。東京都です。"], [["東京都です"]], prefix_len=5)
    # prefix = 東京都です (5 chars) == reference
    assert s["rouge_l"]["mean"] == pytest.approx(1.0)
    assert s["length"]["mean"] == 12  # non-space characters of the whole answer
