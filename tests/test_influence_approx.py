"""Approximate influence: the first-order estimate against answers known in closed form (linear
and quadratic toys, exact_eif after one small step on a tiny model), kronfluence end to end,
and compare_to_exact on hand-built matrices."""

import numpy as np
import pytest
import torch

from factlab.config import PeftSpec
from factlab.errors import FactlabError
from factlab.influence import approx
from factlab.influence.exact import Schedule, exact_eif
from factlab.influence.samples import Sample
from factlab.testing import tiny_model

SAMPLES = [
    Sample("a", "Marta Ilvane runs the", " press line"),
    Sample("b", "The capital of France is", " Paris"),
    Sample("c", "Jonas Perl leads the", " night shift"),
    Sample("d", "", "The quick brown fox jumps over the lazy dog."),
]
PEFT = PeftSpec(targets=["attention", "mlp"], r=4, alpha=8)


@pytest.fixture()
def model(tok):
    return tiny_model("llama", vocab_size=len(tok))


def _toy_exact(losses, theta0, i, opt_cls, **opt_kw):
    """L_j(θ_i) − L_j(θ_0) for every j after one real torch optimizer step on loss i."""
    theta = torch.nn.Parameter(theta0.clone())
    opt = opt_cls([theta], **opt_kw)
    losses[i](theta).backward()
    opt.step()
    with torch.no_grad():
        return np.array([float(L(theta) - L(theta0)) for L in losses])


def _grads(losses, theta0):
    out = []
    for L in losses:
        t = theta0.clone().requires_grad_(True)
        out.append(torch.autograd.grad(L(t), t)[0])
    return torch.stack(out)


def test_linear_toy_first_order_is_exact_for_sgd_and_adamw():
    gen = torch.Generator().manual_seed(0)
    P = 7
    theta0 = torch.randn(P, generator=gen, dtype=torch.float64)
    a = torch.randn(4, P, generator=gen, dtype=torch.float64)
    losses = [lambda t, a=a[j]: a @ t + 3.0 for j in range(4)]
    G = _grads(losses, theta0)
    for sched, opt_cls in [(Schedule(lr=0.3, optimizer="sgd", weight_decay=0.1), torch.optim.SGD),
                           (Schedule(lr=0.3, optimizer="adamw", weight_decay=0.1), torch.optim.AdamW)]:
        est = approx.first_order_matrix(G, G, sched, theta0)
        exact = np.stack([_toy_exact(losses, theta0, i, opt_cls, lr=0.3, weight_decay=0.1) for i in range(4)])
        np.testing.assert_allclose(est, exact, rtol=1e-10, atol=1e-12)


def test_quadratic_toy_first_order_misses_exactly_the_second_order_term():
    # L_j(θ) = ½ (θ − c_j)ᵀ H (θ − c_j): after θ_i = θ_0 − η g_i the change of L_j is
    # −η g_jᵀ g_i + ½ η² g_iᵀ H g_i exactly, so exact − first order = ½ η² g_iᵀ H g_i.
    gen = torch.Generator().manual_seed(1)
    P, eta = 5, 0.05
    X = torch.randn(P, P, generator=gen, dtype=torch.float64)
    H = X @ X.T + torch.eye(P, dtype=torch.float64)
    c = torch.randn(3, P, generator=gen, dtype=torch.float64)
    theta0 = torch.zeros(P, dtype=torch.float64)
    losses = [lambda t, c=c[j]: 0.5 * (t - c) @ H @ (t - c) for j in range(3)]
    G = _grads(losses, theta0)
    est = approx.first_order_matrix(G, G, Schedule(lr=eta, optimizer="sgd"))
    exact = np.stack([_toy_exact(losses, theta0, i, torch.optim.SGD, lr=eta) for i in range(3)])
    second = np.array([0.5 * eta**2 * float(G[i] @ H @ G[i]) for i in range(3)])[:, None]
    np.testing.assert_allclose(exact - est, np.broadcast_to(second, exact.shape), rtol=1e-9)


@pytest.mark.parametrize("optimizer,lrs", [("sgd", (1e-1, 1e-2)), ("adamw", (1e-3, 1e-4))])
def test_first_order_matches_exact_eif_to_second_order(model, tok, optimizer, lrs):
    """One step: the relative error of the first-order estimate falls ~linearly with lr."""
    errs = []
    for lr in lrs:
        sched = Schedule(steps=1, lr=lr, optimizer=optimizer)
        E = exact_eif(model, tok, SAMPLES, SAMPLES, PEFT, sched).mean()
        A, seconds = approx.estimate("first_order", model, tok, SAMPLES, SAMPLES, PEFT, sched)
        assert A.shape == E.shape and seconds > 0
        errs.append(np.linalg.norm(A - E) / np.linalg.norm(E))
    assert errs[0] < 0.1  # already close at the larger lr
    assert errs[1] < errs[0] / 4  # 10x smaller lr: ~10x smaller relative error (float32 noise aside)


def test_first_order_leaves_model_unchanged_and_rows_columns_oriented(model, tok):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sched = Schedule(steps=1, lr=1e-1, optimizer="sgd")
    A, _ = approx.estimate("first_order", model, tok, SAMPLES[:2], SAMPLES, PEFT, sched)
    assert A.shape == (2, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    E = exact_eif(model, tok, SAMPLES[:2], SAMPLES, PEFT, sched).mean()
    assert np.all(np.sign(np.diag(A[:, :2])) == -1) and np.all(np.sign(np.diag(E[:, :2])) == -1)
    np.testing.assert_allclose(A, E, rtol=0.2, atol=1e-4)


def test_kronfluence_identity_is_the_gradient_dot_product_and_ekfac_runs(model, tok):
    pytest.importorskip("kronfluence")
    sched = Schedule(steps=1, lr=1e-2, optimizer="sgd")
    rows = SAMPLES[1:3]  # R != C: the transposition is checked too
    G, _ = approx.estimate("grad_dot", model, tok, rows, SAMPLES, PEFT, sched)
    K, _ = approx.estimate("kronfluence_identity", model, tok, rows, SAMPLES, PEFT, sched)
    assert K.shape == (2, 4)
    np.testing.assert_allclose(K, G, rtol=1e-4, atol=1e-9 * np.abs(G).max())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X, _ = approx.estimate("kronfluence_ekfac", model, tok, rows, SAMPLES, PEFT, sched)
    assert X.shape == (2, 4) and np.isfinite(X).all() and np.abs(X).max() > 0
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert np.all(np.diag(X[:, 1:3]) < 0)  # self-influence: training on a sample helps it


def test_compare_to_exact_on_hand_built_matrices():
    rng = np.random.default_rng(0)
    E = rng.normal(size=(6, 8))
    same = approx.compare_to_exact(E, 3.0 * E)  # a positive scale changes no rank
    assert same["spearman"]["value"] == pytest.approx(1.0) and same["top_k_overlap"]["value"] == 1.0
    flipped = approx.compare_to_exact(E, -E, k=3)
    assert flipped["spearman"]["value"] == pytest.approx(-1.0) and flipped["top_k_overlap"]["value"] == 0.0
    assert flipped["k"] == 3 and len(flipped["spearman_rows"]) == 6
    # one row swapped for another's: that row's correlation drops, the others stay at 1
    A = E.copy()
    A[0] = E[1]
    mixed = approx.compare_to_exact(E, A)
    assert mixed["spearman_rows"][1:] == pytest.approx([1.0] * 5) and mixed["spearman_rows"][0] < 1.0
    assert mixed["spearman"]["ci_low"] <= mixed["spearman"]["value"] <= mixed["spearman"]["ci_high"]
    with pytest.raises(FactlabError, match="one shape"):
        approx.compare_to_exact(E, E[:, :3])


def test_unknown_estimator_lists_the_names(model, tok):
    with pytest.raises(FactlabError, match="first_order, grad_dot, kronfluence_identity"):
        approx.estimate("ekfac", model, tok, SAMPLES, SAMPLES, PEFT)
