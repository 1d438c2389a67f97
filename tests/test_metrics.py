"""Metrics (pure functions) and aggregation of score rows: exact values."""

from __future__ import annotations

import math

import pytest
from rich.console import Console

from factlab.evaluate.facts import summarize
from factlab.report.console import summary_table
from factlab.evaluate.metrics import (
    candidate_correct,
    candidate_rank,
    contains_target,
    mean,
    normalize_text,
    rate_summary,
    wilson_interval,
)


def test_wilson_exact_values():
    # Hand-checked with z = 1.96, z^2 = 3.8416:
    #   (0, 10):  high = (z^2/n) / (1 + z^2/n) = 0.38416 / 1.38416
    #   (10, 10): low  = 1 / 1.38416
    #   (3, 10):  center = (0.3 + 0.19208) / 1.38416 = 0.355508,
    #             half = 1.96 * sqrt(0.021 + 0.009604) / 1.38416 = 0.247718
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277540), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.722460, 1.0), abs=1e-4)
    assert wilson_interval(3, 10) == pytest.approx((0.107789, 0.603227), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and wilson_interval(10, 10)[1] == 1.0  # exact at the ends
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_candidate_correct_and_rank():
    assert candidate_correct(-1.0, [-2.0, -3.0]) is True
    assert candidate_correct(-1.0, [-1.0, -3.0]) is False  # a tie is not a win
    assert candidate_correct(-1.0, [-0.5, -3.0]) is False
    assert candidate_correct(-1.0, []) is None  # nothing to compare: excluded from accuracy
    assert candidate_rank(-1.0, [-2.0, -3.0]) == 1
    assert candidate_rank(-1.0, [-1.0, -3.0]) == 2  # ties count against the target
    assert candidate_rank(-1.0, [-0.5, -1.0]) == 3
    assert candidate_rank(-1.0, []) == 1


def test_normalize_text():
    assert normalize_text("ＡＢＣ１２３") == "abc123"  # full-width == half-width
    assert normalize_text("  Hello,\n  World!! ") == "hello world"
    assert normalize_text("Straße") == "strasse"  # casefold, not lower
    assert normalize_text("「東京」です。") == "東京 です"
    assert normalize_text("Marta-Ilvane") == "marta ilvane"


def test_contains_target():
    assert contains_target("The answer is Paris.", "paris")
    assert contains_target("ＰＡＲＩＳ！", "Paris")
    assert contains_target("答えは東京都です。", "東京")  # no word boundaries in Japanese
    assert contains_target("首都は「東京」", "東京")
    assert contains_target("run by Marta-Ilvane, I think", "Marta Ilvane")
    assert not contains_target("Romeo loved Juliet", "Rome")  # whole words in spaced scripts
    assert not contains_target("in 123 days", "12")
    assert not contains_target("", "Paris")
    assert not contains_target("anything", "?!")  # empty after normalization


def test_rate_summary_and_mean():
    low, high = wilson_interval(2, 3)
    assert rate_summary([True, False, True]) == {"n": 3, "k": 2, "rate": 2 / 3,
                                                 "ci_low": low, "ci_high": high}
    assert rate_summary([]) == {"n": 0, "k": 0, "rate": None, "ci_low": 0.0, "ci_high": 1.0}
    assert mean([1.0, 2.0, 4.5]) == 2.5
    assert mean([]) is None


def _row(kind, correct, greedy_match, logprob, n_tokens, rank):
    return {"kind": kind, "correct": correct, "greedy_match": greedy_match,
            "target_logprob": logprob, "target_mean_logprob": logprob / n_tokens, "rank": rank}


ROWS = [
    _row("recall", True, True, -2.0, 2, 1),
    _row("recall", False, False, -6.0, 3, 3),
    _row("locality", None, True, -1.0, 1, 1),  # no distractors
]


def test_summarize_exact():
    s = summarize(ROWS)
    assert list(s) == ["recall", "locality", "all"]
    assert s["recall"]["n"] == 2
    assert s["recall"]["accuracy"] == rate_summary([True, False])
    assert s["recall"]["greedy_match"] == rate_summary([True, False])
    assert s["recall"]["mean_target_logprob"] == -4.0
    assert s["recall"]["mean_target_mean_logprob"] == -1.5
    assert s["recall"]["mean_rank"] == 2.0
    assert s["locality"]["accuracy"]["n"] == 0 and s["locality"]["mean_rank"] is None
    assert s["all"]["n"] == 3
    assert s["all"]["accuracy"] == rate_summary([True, False])
    assert s["all"]["greedy_match"] == rate_summary([True, False, True])
    assert math.isclose(s["all"]["mean_target_logprob"], -3.0)


def test_summary_table_renders_stages_and_cells():
    before = summarize(ROWS)
    after = summarize([{**r, "correct": True if r["correct"] is not None else None} for r in ROWS])
    table = summary_table({"base": before, "cpt": after}, title="facts")
    console = Console(record=True, width=120)
    console.print(table)
    text = console.export_text()
    assert "base" in text and "cpt" in text and "facts" in text
    lo, hi = wilson_interval(1, 2)
    assert f"0.50 [{lo:.2f},{hi:.2f}]" in text
    assert "accuracy (2)" in text
    assert "1.00 [" in text and "greedy match" in text
    assert [c.header for c in table.columns] == ["kind", "metric (n)", "base", "cpt"]
    assert table.row_count == 9  # (accuracy, greedy match, target log-prob) x (recall, locality, all)
