"""What good influence should look like, as pure functions over saved matrices.

Every function takes an influence matrix M (rows: the sample trained on, columns: the sample
scored; M[i, j] = L_j(θ_i) − L_j(θ_0), negative = helped) and returns a number, or an interval
dict ``{n, value, ci_low, ci_high}`` from a percentile bootstrap over samples (rows, or
rows and columns together for the square, symmetric questions). Nothing here loads a model,
so the same functions serve the fine-tuning matrix, the in-context matrix and the CNN one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import spearmanr


def _interval(value: float | None, boots: Sequence[float], n: int, level: float = 0.95) -> dict:
    """``{n, value, ci_low, ci_high}``; the ends are None when no resample gave a number."""
    b = np.asarray([x for x in boots if x is not None and np.isfinite(x)], dtype=np.float64)
    if value is None or not np.isfinite(value) or b.size == 0:
        return {"n": n, "value": None if value is None or not np.isfinite(value) else float(value),
                "ci_low": None, "ci_high": None}
    alpha = (1 - level) / 2
    low, high = np.quantile(b, [alpha, 1 - alpha])
    return {"n": n, "value": float(value), "ci_low": float(low), "ci_high": float(high)}


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation; None when either side is constant (no correlation is defined)."""
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def symmetry(M: np.ndarray) -> float | None:
    """Correlation of M with its transpose over the off-diagonal pairs i < j of a square M.

    1 for a symmetric matrix, −1 for an antisymmetric one; None when it is undefined (fewer
    than 3 samples, or constant off-diagonal entries). The diagonal (self-influence) is left out
    because it is the same on both sides and would inflate the correlation.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"symmetry needs a square matrix, got shape {M.shape}")
    iu = np.triu_indices(M.shape[0], k=1)
    return _pearson(M[iu], M.T[iu])


def symmetry_interval(M: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict:
    """symmetry(M) with a bootstrap over samples: resample sample indices with replacement and
    take the sub-matrix on those rows and columns; pairs of a sample with its own copy (the
    diagonal after resampling) are left out."""
    M = np.asarray(M, dtype=np.float64)
    n = M.shape[0]
    value = symmetry(M)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        a, b = np.triu_indices(n, k=1)
        keep = idx[a] != idx[b]
        x, y = M[idx[a][keep], idx[b][keep]], M[idx[b][keep], idx[a][keep]]
        boots.append(_pearson(x, y))
    return _interval(value, boots, n)


def top_k_share(M: np.ndarray, k: int = 5, exclude_diagonal: bool = True) -> np.ndarray:
    """Per row: the share of the row's total |influence| that its k largest |entries| hold.

    A sparse row (one sample moves a few others) gives a share near 1; a row that moves every
    sample alike gives k / n_columns. The diagonal is left out by default: self-influence is
    always large and would make every row look sparse. Rows whose total is 0 give NaN.
    """
    A = np.abs(np.asarray(M, dtype=np.float64)).copy()
    if exclude_diagonal:
        if A.shape[0] != A.shape[1]:
            raise ValueError("exclude_diagonal needs a square matrix (rows and columns the same samples)")
        np.fill_diagonal(A, 0.0)
    total = A.sum(axis=1)
    k = min(k, A.shape[1])
    top = -np.sort(-A, axis=1)[:, :k].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, top / total, np.nan)


def mean_interval(values: Sequence[float], n_resamples: int = 1000, seed: int = 0) -> dict:
    """Mean of the finite values with a percentile-bootstrap interval over them."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "value": None, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, v.size, size=(n_resamples, v.size))].mean(axis=1)
    return _interval(float(v.mean()), list(boots), int(v.size))


def sparsity_interval(M: np.ndarray, k: int = 5, exclude_diagonal: bool = True,
                      n_resamples: int = 1000, seed: int = 0) -> dict:
    """Mean top-k share over rows, with a bootstrap interval over rows."""
    return mean_interval(list(top_k_share(M, k, exclude_diagonal)), n_resamples, seed)


def row_spearman(exact: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """Per row: Spearman rank correlation of an approximate influence row with the exact one
    (NaN where a row is constant). Used to judge an approximation against the exact matrix."""
    E, A = np.asarray(exact, dtype=np.float64), np.asarray(approx, dtype=np.float64)
    if E.shape != A.shape:
        raise ValueError(f"shapes differ: exact {E.shape} vs approx {A.shape}")
    out = np.full(E.shape[0], np.nan)
    for i in range(E.shape[0]):
        if np.std(E[i]) > 0 and np.std(A[i]) > 0:
            out[i] = spearmanr(E[i], A[i]).statistic
    return out


def top_k_overlap(exact: np.ndarray, approx: np.ndarray, k: int = 5) -> np.ndarray:
    """Per row: the share of the exact row's k most helped samples (most negative entries) that
    the approximate row also puts in its k most negative."""
    E, A = np.asarray(exact, dtype=np.float64), np.asarray(approx, dtype=np.float64)
    if E.shape != A.shape:
        raise ValueError(f"shapes differ: exact {E.shape} vs approx {A.shape}")
    k = min(k, E.shape[1])
    te, ta = np.argsort(E, axis=1)[:, :k], np.argsort(A, axis=1)[:, :k]
    return np.array([len(set(te[i]) & set(ta[i])) / k for i in range(E.shape[0])])


def group_means(M: np.ndarray, row_groups: Sequence[str | None], col_groups: Sequence[str | None],
                same_sample: Callable[[int, int], bool] | None = None) -> dict[str, list[float]]:
    """Entries of M split into `same` group and `different` group (rows and columns tagged with
    groups; untagged samples are left out). `same_sample(i, j)` marks pairs to leave out (a
    sample with itself). Returns the raw entries so that callers can take means and intervals."""
    M = np.asarray(M, dtype=np.float64)
    same, diff = [], []
    for i, gi in enumerate(row_groups):
        for j, gj in enumerate(col_groups):
            if gi is None or gj is None or (same_sample is not None and same_sample(i, j)):
                continue
            (same if gi == gj else diff).append(float(M[i, j]))
    return {"same": same, "different": diff}
