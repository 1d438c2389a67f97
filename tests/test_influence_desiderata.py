"""Desiderata metrics on hand-built matrices whose answers are known."""

import numpy as np
import pytest

from factlab.influence.desiderata import (
    group_means, row_spearman, sparsity_interval, symmetry, symmetry_interval, top_k_overlap, top_k_share,
)


def test_symmetric_matrix_has_symmetry_one():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    assert symmetry(A + A.T) == pytest.approx(1.0)


def test_antisymmetric_matrix_has_symmetry_minus_one():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(6, 6))
    assert symmetry(A - A.T) == pytest.approx(-1.0)


def test_symmetry_ignores_the_diagonal():
    M = np.array([[100.0, 1, 2], [1, -50, 3], [2, 3, 7]])
    assert symmetry(M) == pytest.approx(1.0)


def test_symmetry_interval_contains_value_and_is_reproducible():
    rng = np.random.default_rng(2)
    A = rng.normal(size=(12, 12))
    M = A + 0.3 * A.T
    a, b = symmetry_interval(M, seed=3), symmetry_interval(M, seed=3)
    assert a == b
    assert a["ci_low"] <= a["value"] <= a["ci_high"]
    assert a["n"] == 12


def test_symmetry_rejects_non_square():
    with pytest.raises(ValueError):
        symmetry(np.zeros((2, 3)))


def test_top_k_share_of_one_hot_rows_is_one_and_of_flat_rows_is_k_over_n():
    one_hot = np.array([[9.0, 0, 0, -4], [0, 9.0, 2, 0], [0, 0, 9.0, 0], [1, 0, 0, 9.0]])
    np.testing.assert_allclose(top_k_share(one_hot, k=1), [1.0, 1.0, np.nan, 1.0])
    flat = np.ones((5, 5))
    np.testing.assert_allclose(top_k_share(flat, k=2), [0.5] * 5)  # 2 of 4 off-diagonal entries


def test_sparsity_interval_mean_of_rows():
    flat = np.ones((5, 5))
    s = sparsity_interval(flat, k=1)
    assert s["value"] == pytest.approx(0.25)
    assert s["ci_low"] == pytest.approx(0.25) and s["ci_high"] == pytest.approx(0.25)


def test_row_spearman_and_top_k_overlap():
    E = np.array([[0.0, -1, -2, -3, 4], [1, 2, 3, 4, 5]])
    A = 10 * E + 1  # monotone in every row
    np.testing.assert_allclose(row_spearman(E, A), [1.0, 1.0])
    np.testing.assert_allclose(top_k_overlap(E, A, k=2), [1.0, 1.0])
    np.testing.assert_allclose(row_spearman(E, -E), [-1.0, -1.0])
    np.testing.assert_allclose(top_k_overlap(E, -E, k=2), [0.0, 0.0])


def test_group_means_splits_same_and_different():
    M = np.array([[0.0, -1, 5], [-1, 0, 6], [7, 8, 0]])
    g = ["a", "a", "b"]
    out = group_means(M, g, g, same_sample=lambda i, j: i == j)
    assert sorted(out["same"]) == [-1.0, -1.0]
    assert sorted(out["different"]) == [5.0, 6.0, 7.0, 8.0]
