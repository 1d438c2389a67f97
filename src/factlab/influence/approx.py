"""Approximate influence matrices, judged against the exact one.

Every estimate here has the exact matrix's shape and sign convention (``influence.exact``):
rows are the samples trained on, columns the samples scored, entry (i, j) estimates
L_j(θ_i) − L_j(θ_0), negative = training on i made j more likely. All gradients are taken at
θ_0 over the same trainable parameters ``exact_eif`` trains: the adapter that
``fresh_adapter(model, peft, seed)`` builds with the same seed (for LoRA only B has a non-zero
gradient there, since B = 0 makes ∂L/∂A = 0).

Estimators (``estimate(name, ...)``, ``names()`` lists them):

- ``first_order``: L_j(θ_0 + Δθ_i) − L_j(θ_0) ≈ ∇L_j · Δθ_i, with Δθ_i the first optimizer
  step on sample i alone, computed in closed form from ∇L_i and repeated ``schedule.steps``
  times: SGD Δθ = −lr (∇L_i + wd θ_0); AdamW's first step (bias-corrected moments m̂ = g,
  v̂ = g²) Δθ = −lr (g / (|g| + eps) + wd θ_0), i.e. the sign form −lr·sign(∇L_i) with torch's
  eps = 1e-8; gradient clipping as torch applies it. With one SGD or AdamW step this is exact
  to O(lr²); for more steps it ignores how the gradient changes along the way.
- ``grad_dot``: the textbook baseline −lr · steps · ∇L_j · ∇L_i whatever the optimizer.
- ``kronfluence_identity`` / ``_diagonal`` / ``_kfac`` / ``_ekfac``: kronfluence's pairwise
  influence scores with that Hessian approximation (identity = plain gradient dot product;
  EK-FAC = eigenvalue-corrected Kronecker factors fitted on the row samples). See
  :func:`kronfluence_scores` for the sign and scale.

Gradients are computed once per distinct sample (a sample that is both a row and a column
is differentiated once), then the whole matrix is one product (R, P) @ (P, C).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from factlab.errors import FactlabError
from factlab.influence import desiderata
from factlab.influence.exact import RowTrainer, Schedule, deterministic, sample_loss, training_batch
from factlab.influence.samples import Sample

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from factlab.config import PeftSpec

ADAM_EPS = 1e-8  # torch.optim.AdamW's default eps, which RowTrainer uses


# ---------------------------------------------------------------------------------------
# First order: closed-form first step, one matrix product


def update_direction(grads: torch.Tensor, schedule: Schedule, theta0: torch.Tensor | None = None) -> torch.Tensor:
    """Δθ per row to first order: the first optimizer step on each row's sample, times
    ``schedule.steps``. grads (R, P) = ∇L_i(θ_0); theta0 (P,) the starting trainable
    parameters (only needed with weight decay). Returns (R, P).

    SGD (no momentum): −lr (clip(g) + wd θ_0). AdamW's first step: torch's bias correction
    makes m̂ = g and v̂ = g², so the step is −lr (g / (|g| + eps) + wd θ_0) (decoupled decay).
    Repeating the step ``steps`` times is what both optimizers do while the gradient stays g
    (Adam's m̂, v̂ stay g, g²)."""
    g = grads
    if schedule.max_grad_norm is not None:  # torch.nn.utils.clip_grad_norm_: coef = max / (norm + 1e-6), at most 1
        norm = g.norm(dim=1, keepdim=True)
        g = g * torch.clamp(schedule.max_grad_norm / (norm + 1e-6), max=1.0)
    step = g if schedule.optimizer == "sgd" else g / (g.abs() + ADAM_EPS)
    if schedule.weight_decay and theta0 is not None:
        step = step + schedule.weight_decay * theta0.unsqueeze(0)
    return -schedule.lr * schedule.steps * step


def first_order_matrix(row_grads: torch.Tensor, col_grads: torch.Tensor, schedule: Schedule,
                       theta0: torch.Tensor | None = None) -> np.ndarray:
    """(R, C) first-order estimate ∇L_j · Δθ_i from row gradients (R, P) and column gradients
    (C, P) at θ_0 (float64 product)."""
    delta = update_direction(row_grads.double(), schedule, None if theta0 is None else theta0.double())
    return (delta @ col_grads.double().T).numpy()


def sample_gradients(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     params: Sequence[tuple[str, torch.nn.Parameter]], samples: Sequence[Sample],
                     console=None) -> torch.Tensor:
    """∇_θ L_s(θ) for each sample over ``params`` (flattened in their order): (N, P) float32.
    One forward/backward per sample (per-sample gradients need a backward each; the samples
    differ in length, so batching would need padding and a per-sample loss split for no gain
    at these sizes)."""
    from factlab.influence.exact import progress_bar

    device = next(model.parameters()).device
    tensors = [p for _, p in params]
    out = torch.zeros(len(samples), sum(p.numel() for p in tensors))
    model.eval()  # dropout off: the gradient at θ_0 (peft.dropout defaults to 0 anyway)
    with progress_bar(console) as progress:
        task = progress.add_task("sample gradients", total=len(samples), rate="")
        for k, s in enumerate(samples):
            loss = sample_loss(model, training_batch(tokenizer, s, device))
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            out[k] = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float()
                                for p, g in zip(tensors, grads)])
            progress.update(task, advance=1)
    return out


def _distinct(rows: Sequence[Sample], columns: Sequence[Sample]) -> tuple[list[Sample], list[int], list[int]]:
    """Distinct samples of rows + columns and each row's / column's index among them."""
    uniq: dict[Sample, int] = {}
    for s in [*rows, *columns]:
        uniq.setdefault(s, len(uniq))
    return list(uniq), [uniq[s] for s in rows], [uniq[s] for s in columns]


def _gradient_estimate(model, tokenizer, rows, columns, peft, schedule, seed, console, plain: bool) -> np.ndarray:
    trainer = RowTrainer(model, tokenizer, peft, schedule, seed)
    try:
        with deterministic():
            samples, ri, ci = _distinct(rows, columns)
            G = sample_gradients(trainer.model, tokenizer, trainer.params, samples, console)  # (N, P)
            theta0 = torch.cat([p.detach().reshape(-1).float() for _, p in trainer.params])
        if plain:  # −lr·steps·∇L_j·∇L_i, as if the step were plain SGD
            sched = Schedule(steps=schedule.steps, lr=schedule.lr, optimizer="sgd")
            return first_order_matrix(G[ri], G[ci], sched)
        return first_order_matrix(G[ri], G[ci], schedule, theta0)
    finally:
        trainer.release()


def first_order(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sample],
                columns: Sequence[Sample], peft: PeftSpec, schedule: Schedule = Schedule(), seed: int = 0,
                console=None) -> np.ndarray:
    """(R, C) first-order estimate ∇L_j(θ_0) · Δθ_i with the optimizer's own first step Δθ_i
    (see :func:`update_direction`: the sign form for AdamW, the gradient for SGD). The model
    comes back unwrapped and unchanged."""
    return _gradient_estimate(model, tokenizer, rows, columns, peft, schedule, seed, console, plain=False)


def grad_dot(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sample],
             columns: Sequence[Sample], peft: PeftSpec, schedule: Schedule = Schedule(), seed: int = 0,
             console=None) -> np.ndarray:
    """(R, C) gradient dot product −lr · steps · ∇L_j · ∇L_i at θ_0 (the optimizer ignored)."""
    return _gradient_estimate(model, tokenizer, rows, columns, peft, schedule, seed, console, plain=True)


# ---------------------------------------------------------------------------------------
# kronfluence


KRONFLUENCE_STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")


def _tracked_linear_modules(wrapped: torch.nn.Module) -> list[str]:
    """Names of the nn.Linear modules whose weight is trained: for LoRA the B matrices only.
    LoRA's A has zero gradient at θ_0 (B = 0), and PEFT's forward reads ``lora_A.weight``,
    which kronfluence's TrackedModule wrapper does not expose, so A is left untracked."""
    names = []
    for name, mod in wrapped.named_modules():
        if type(mod) is torch.nn.Linear and mod.weight.requires_grad and ".lora_A." not in f"{name}.":
            names.append(name)
    return names


def kronfluence_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sample],
                       columns: Sequence[Sample], peft: PeftSpec, schedule: Schedule = Schedule(),
                       seed: int = 0, strategy: str = "ekfac", damping: float | None = None,
                       console=None) -> np.ndarray:
    """(R, C) influence estimate from kronfluence's pairwise scores with ``strategy``.

    kronfluence (Grosse et al. 2023) returns score[j, i] = ∇f_j(θ_0)ᵀ P ∇L_i(θ_0), with f_j the
    measurement (here L_j, the column's mean NLL per scored token), L_i the row's training loss
    (the same per-sample mean, so per-sample gradients are ∇L_i exactly) and P the inverse
    (damped) Hessian approximation of ``strategy`` (identity: P = I; EK-FAC: Kronecker
    eigenbases with fitted eigenvalues, fitted on the row samples with labels sampled from the
    model, i.e. the true Fisher). A positive score means "upweighting i lowers f_j": helped.
    The EIF convention is negative = helped, and a step of size lr moves θ by −lr·P∇L_i in
    this picture, so the estimate is −lr · steps · score[j, i] (transposed to rows × columns).
    With ``identity`` this equals ``grad_dot`` (over the tracked modules); with the other
    strategies the scale is that of a Newton step, not of the real optimizer step, so compare
    ranks (Spearman), not magnitudes. damping None: kronfluence's heuristic, 0.1 × the mean
    eigenvalue (the Fisher of a few samples is very low-rank, so a tiny fixed damping would
    blow up its null space).

    Tracks the nn.Linear layers whose weight is trained (LoRA: the B matrices; ``full``: the
    targeted Linear weights); other trainable parameters (DoRA magnitudes, IA3 vectors,
    virtual tokens) are not covered: such methods raise FactlabError.
    """
    import tempfile

    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.module.tracked_module import TrackedModule
        from kronfluence.task import Task
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise FactlabError("kronfluence is not installed; run: pip install --no-deps kronfluence==1.0.1 "
                           "einops==0.8.2 einconv==0.1.0 opt-einsum==3.4.0") from e
    if strategy not in KRONFLUENCE_STRATEGIES:
        raise FactlabError(f"unknown kronfluence strategy {strategy!r}; use one of: {', '.join(KRONFLUENCE_STRATEGIES)}")
    if peft.method not in ("lora", "rslora", "full"):
        raise FactlabError(f"kronfluence estimates cover nn.Linear weights only: use peft.method lora, rslora or "
                           f"full, not {peft.method}")

    trainer = RowTrainer(model, tokenizer, peft, schedule, seed)
    wrapped = trainer.model
    tracked = _tracked_linear_modules(wrapped)
    if not tracked:
        trainer.release()
        raise FactlabError("no trained nn.Linear layer for kronfluence to track; check influence.peft.targets")
    untracked = [n for n, p in trainer.params if not any(n.startswith(t + ".") for t in tracked)
                 and ".lora_A." not in n]
    if untracked:
        trainer.release()
        raise FactlabError(f"kronfluence cannot track {untracked[0]} (not an nn.Linear weight); "
                           "use LoRA targets or full fine-tuning of Linear layers")

    def per_sample_nll(batch, m, sample: bool) -> torch.Tensor:
        # Sum over the batch of each sample's MEAN NLL per scored token, so that a per-sample
        # gradient is ∇L_i exactly (kronfluence differentiates the batch sum per sample).
        logits = m(input_ids=batch["input_ids"]).logits[:, :-1].float()  # (B, T-1, V)
        labels = batch["labels"][:, 1:]  # (B, T-1), −100 on the context
        if sample:  # true Fisher: labels drawn from the model's own distribution
            with torch.no_grad():
                drawn = torch.distributions.Categorical(logits=logits).sample()
            labels = torch.where(labels == -100, labels, drawn)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                reduction="none")  # (B, T-1)
        mask = (labels != -100).float()
        return (nll.sum(dim=1) / mask.sum(dim=1)).sum()

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return per_sample_nll(batch, model, sample)

        def compute_measurement(self, batch, model):
            return per_sample_nll(batch, model, False)

        def get_influence_tracked_modules(self):
            return tracked

    class _Samples(torch.utils.data.Dataset):
        def __init__(self, samples):
            # Batch size 1 throughout: no padding, each item {input_ids (T,), labels (T,)}.
            self.items = [{k: v[0] for k, v in training_batch(tokenizer, s).items()} for s in samples]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    task = _Task()
    requires = {n: p.requires_grad for n, p in wrapped.named_parameters()}
    try:
        import logging

        prepared = prepare_model(wrapped, task)
        with tempfile.TemporaryDirectory(prefix="factlab-kronfluence-") as tmp, deterministic():
            torch.manual_seed(seed)  # the sampled Fisher labels
            analyzer = Analyzer("factlab", prepared, task, cpu=True, disable_tqdm=True, output_dir=tmp,
                                log_level=logging.WARNING)
            analyzer.fit_all_factors("factors", dataset=_Samples(rows), per_device_batch_size=1,
                                     factor_args=FactorArguments(strategy=strategy), overwrite_output_dir=True)
            analyzer.compute_pairwise_scores(
                "scores", "factors", query_dataset=_Samples(columns), train_dataset=_Samples(rows),
                per_device_query_batch_size=1, per_device_train_batch_size=1,
                score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores("scores")  # compute_... returns None in 1.0.1
        S = scores["all_modules"].double().numpy()  # (C, R): queries × train
    finally:
        # Undo prepare_model: put the original Linear layers back and restore requires_grad,
        # then the trainer unwraps the adapter as exact_eif does.
        for name, mod in list(wrapped.named_modules()):
            if isinstance(mod, TrackedModule):
                parent = wrapped.get_submodule(name.rpartition(".")[0]) if "." in name else wrapped
                setattr(parent, name.rpartition(".")[2], mod.original_module)
        for n, p in wrapped.named_parameters():
            p.requires_grad_(requires.get(n, False))
        trainer.release()
    return -schedule.lr * schedule.steps * S.T


# ---------------------------------------------------------------------------------------
# Registry and comparison


def _kron(strategy: str) -> Callable:
    def fn(model, tokenizer, rows, columns, peft, schedule=Schedule(), seed=0, console=None):
        return kronfluence_scores(model, tokenizer, rows, columns, peft, schedule, seed, strategy, console=console)
    fn.__doc__ = f"kronfluence pairwise scores with the {strategy} Hessian approximation (see kronfluence_scores)."
    return fn


ESTIMATORS: dict[str, Callable] = {
    "first_order": first_order,
    "grad_dot": grad_dot,
    **{f"kronfluence_{s}": _kron(s) for s in KRONFLUENCE_STRATEGIES},
}


def names() -> list[str]:
    """The estimator names ``estimate`` accepts."""
    return list(ESTIMATORS)


def estimate(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sample],
             columns: Sequence[Sample], peft: PeftSpec, schedule: Schedule = Schedule(), seed: int = 0,
             console=None) -> tuple[np.ndarray, float]:
    """Run the estimator ``name`` and time it: ((R, C) float64 estimate, wall seconds). Uses the
    adapter ``exact_eif`` would build with ``seed``; the model comes back unwrapped and unchanged."""
    if name not in ESTIMATORS:
        raise FactlabError(f"unknown influence approximation {name!r}; use one of: {', '.join(ESTIMATORS)}")
    if not rows or not columns:
        raise FactlabError("influence needs at least one row sample and one column sample")
    t0 = time.perf_counter()
    M = ESTIMATORS[name](model, tokenizer, rows, columns, peft, schedule, seed, console=console)
    return np.asarray(M, dtype=np.float64), time.perf_counter() - t0


def compare_to_exact(exact: np.ndarray, approx: np.ndarray, k: int = 5, seed: int = 0) -> dict:
    """How well an (R, C) approximation ranks like the exact matrix: ``spearman`` (per-row rank
    correlation; mean over rows with a bootstrap interval), ``top_k_overlap`` (share of each
    exact row's k most helped columns that the approximation also puts in its k most helped;
    mean with interval), ``spearman_rows`` / ``overlap_rows`` (the per-row values, NaN for a
    constant row) and ``k``. The caller adds seconds and the speed ratio."""
    E, A = np.asarray(exact, dtype=np.float64), np.asarray(approx, dtype=np.float64)
    if E.ndim != 2 or E.shape != A.shape:
        raise FactlabError(f"compare_to_exact needs two (rows, columns) matrices of one shape, got {E.shape} and {A.shape}")
    rho = desiderata.row_spearman(E, A)
    ov = desiderata.top_k_overlap(E, A, k)
    return {"spearman": desiderata.mean_interval(list(rho), seed=seed),
            "top_k_overlap": desiderata.mean_interval(list(ov), seed=seed),
            "spearman_rows": [None if not np.isfinite(x) else float(x) for x in rho],
            "overlap_rows": [float(x) for x in ov], "k": int(min(k, E.shape[1]))}
