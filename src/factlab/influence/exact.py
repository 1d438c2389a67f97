"""The exact empirical influence matrix: one short fine-tune per training sample.

For each row sample i the base model θ_0 is fine-tuned on i alone with a fresh adapter (the
same schedule for every i), giving θ_i; every column sample j is then scored on θ_i:

    EIF[i, j] = L_j(θ_i) − L_j(θ_0)

L_j is the mean negative log-prob per token (nats) of j's scored part given its context, from
the one scoring path (``factlab.evaluate.scoring.Scorer``). Negative: training on i made j
more likely. The diagonal is the self-influence (negative after a step that lowers the loss).

Speed: the model is wrapped ONCE per seed (``build_peft_model``, as a stage does); the trainable
state (adapter weights, or the targeted weights for ``full``) is snapshotted in memory and
copied back before every row, with a fresh optimizer each row. Nothing is reloaded from disk.

The per-row training loop is plain torch, not the transformers Trainer: a row is one sample
and a few optimizer steps, and the Trainer's per-call setup (accelerate state, dataloader,
callbacks, scheduler, logging) would cost more than the steps themselves. The loss is the one
factlab's stages use (the model's own causal-LM loss: mean cross-entropy over labelled tokens)
on exactly the tokens the Scorer scores: labels only on the scored part (the target of a
Q&A pair or probe; the whole text of a document), so the loss of sample i at θ_0 is L_i(θ_0).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from factlab.errors import FactlabError
from factlab.influence.samples import Sample, scored_pair

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from factlab.config import PeftSpec


@dataclass(frozen=True)
class Schedule:
    """The per-sample fine-tune, the same for every row.

    steps: optimizer steps on the one sample (the default 1 = one epoch of that sample);
    lr: learning rate (constant, no warm-up); optimizer: ``adamw`` (torch AdamW, betas
    (0.9, 0.999), eps 1e-8, fresh state every row) or ``sgd`` (plain SGD, no momentum);
    weight_decay: AdamW / SGD weight decay; max_grad_norm: clip the gradient's global norm
    (None: no clipping; with ``sgd``, 1 step and no clipping the update is exactly
    −lr·∇L_i, the setting where a first-order estimate −lr·∇L_j·∇L_i is exact to first order);
    batch_size: columns per scoring forward.
    """

    steps: int = 1
    lr: float = 1e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise FactlabError(f"influence steps must be at least 1, got {self.steps}")
        if self.lr <= 0:
            raise FactlabError(f"influence lr must be positive, got {self.lr}")
        if self.optimizer not in ("adamw", "sgd"):
            raise FactlabError(f"influence optimizer must be adamw or sgd, got {self.optimizer!r}")


@dataclass
class EIFResult:
    """An exact influence matrix over seeds.

    eif[s, i, j] = L_j(θ_i) − L_j(θ_0) for seed ``seeds[s]``, row sample ``row_ids[i]``
    (trained on) and column sample ``col_ids[j]`` (scored); shape (S, R, C), float64, nats
    per token. base_loss[s, j] = L_j(θ_0), shape (S, C). train_loss[s, i, k]: the loss of
    row i's sample before optimizer step k, shape (S, R, steps) (train_loss[s, i, 0] is
    L_i(θ_0) up to float rounding). row_seconds[s, i]: wall time of row i (reset, train,
    score every column); seconds: the whole matrix including the base scoring.
    """

    row_ids: list[str]
    col_ids: list[str]
    seeds: list[int]
    eif: np.ndarray
    base_loss: np.ndarray
    train_loss: np.ndarray
    row_seconds: np.ndarray
    seconds: float
    trainable_params: int = 0
    notes: dict = field(default_factory=dict)

    def mean(self) -> np.ndarray:
        """The matrix averaged over seeds, (R, C)."""
        return self.eif.mean(axis=0)


# ---------------------------------------------------------------------------------------
# Tokens and losses


def sample_tokens(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> tuple[list[int], int]:
    """(input ids, number of context tokens) of a sample: the Scorer's tokenization
    (``split_pair`` on ``scored_pair``; an empty context becomes the BOS/EOS stand-in).
    The tokens after the first ``n_context`` are the scored part."""
    from factlab.evaluate.tokens import prefix_id, split_pair

    ctx_text, cont_text = scored_pair(sample, tokenizer)
    ctx, cont = split_pair(tokenizer, ctx_text, cont_text)
    ctx = ctx or [prefix_id(tokenizer)]  # an empty context: the Scorer's stand-in token
    return ctx + cont, len(ctx)


def training_batch(tokenizer: PreTrainedTokenizerBase, sample: Sample,
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One-sample batch {input_ids (1, T), labels (1, T)}: labels −100 on the context, so the
    model's causal-LM loss is the mean NLL per scored token, L_sample."""
    ids, n_ctx = sample_tokens(tokenizer, sample)
    labels = [-100] * n_ctx + ids[n_ctx:]
    return {"input_ids": torch.tensor([ids], device=device), "labels": torch.tensor([labels], device=device)}


def sample_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of a one-sample batch (a scalar with grad): factlab's stage loss."""
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def column_losses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  pairs: Sequence[tuple[str, str]], batch_size: int = 16) -> np.ndarray:
    """L_j for each (context, continuation) pair: mean NLL per continuation token, (C,) float64,
    in one batched pass of the Scorer.

    The Scorer's shared-prefix path (each distinct context once, continuations from its cache)
    is used only when contexts repeat (fewer distinct contexts than 3/4 of the pairs, e.g.
    documents, which all start from BOS): for all-distinct contexts it costs two forwards
    instead of one (50 SmolLM2 columns: 3.4 s CPU shared vs 2.5 s plain, same losses to 3e-5).
    """
    from factlab.evaluate.scoring import Scorer

    pairs = list(pairs)
    share = len({ctx for ctx, _ in pairs}) < 0.75 * len(pairs)
    out = Scorer(model, tokenizer, batch_size=batch_size, share_prefix=share).loglikelihood(pairs)
    return np.array([-ll.logprob / ll.n_tokens for ll in out], dtype=np.float64)


# ---------------------------------------------------------------------------------------
# The row trainer: wrap once, reset in memory


@contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic torch kernels for the block (restored after), so a row computed twice is
    bit-identical on CPU."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def fresh_adapter(model: PreTrainedModel, peft: PeftSpec, seed: int):
    """Wrap ``model`` for training as a stage does (``build_peft_model``), seeded so that the
    adapter's random initialisation depends on ``seed`` only. Returns (model to train,
    [(name, parameter)] of the trainable parameters in ``named_parameters`` order).

    For LoRA the adapter starts at B = 0, so the wrapped model computes exactly θ_0."""
    from transformers import set_seed

    from factlab.train.peft_methods import build_peft_model

    set_seed(seed)
    wrapped, _ = build_peft_model(model, peft)
    params = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    if not params:
        raise FactlabError("the influence adapter has no trainable parameters; check influence.peft.targets")
    return wrapped, params


class RowTrainer:
    """One wrapped model whose trainable state is reset in memory before every row.

    ``fit(sample)`` restores the snapshot taken at construction, builds a fresh optimizer,
    runs ``schedule.steps`` steps on the sample and leaves the model at θ_i (eval mode);
    ``reset()`` brings it back to θ_0; ``release()`` resets and returns the unwrapped model.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, peft: PeftSpec,
                 schedule: Schedule, seed: int = 0):
        from factlab.methods import method_info

        self.tokenizer, self.schedule, self.seed = tokenizer, schedule, seed
        self.wraps = method_info(peft.method).wraps
        self.model, self.params = fresh_adapter(model, peft, seed)
        # The snapshot: a copy of every trainable tensor, e.g. LoRA A (r, in) and B (out, r).
        self.snapshot = [p.detach().clone() for _, p in self.params]
        self.model.eval()

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def reset(self) -> None:
        """Copy the snapshot back into the trainable parameters and drop their gradients."""
        with torch.no_grad():
            for (_, p), saved in zip(self.params, self.snapshot):
                p.copy_(saved)
                p.grad = None

    def _optimizer(self) -> torch.optim.Optimizer:
        s = self.schedule
        params = [p for _, p in self.params]
        if s.optimizer == "sgd":
            return torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay)
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)

    def fit(self, sample: Sample) -> list[float]:
        """Reset to θ_0, train on ``sample`` alone, leave the model at θ_i. Returns the loss
        before each step."""
        self.reset()
        torch.manual_seed(self.seed)  # dropout (if any) draws the same masks for every row
        device = next(self.model.parameters()).device
        batch = training_batch(self.tokenizer, sample, device)
        opt = self._optimizer()
        losses = []
        self.model.train()
        try:
            for _ in range(self.schedule.steps):
                opt.zero_grad(set_to_none=True)
                loss = sample_loss(self.model, batch)
                loss.backward()
                if self.schedule.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.schedule.max_grad_norm)
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            self.model.eval()
            opt.zero_grad(set_to_none=True)
        return losses

    def release(self) -> PreTrainedModel:
        """Reset to θ_0 and give back the plain model (the adapter removed)."""
        self.reset()
        if self.wraps:
            return self.model.unload()
        for _, p in self.params:
            p.requires_grad_(False)
        return self.model


def progress_bar(console: Console | None):
    """factlab's progress bar (train.progress.progress_bar) with the seconds per row."""
    from rich.progress import TextColumn

    from factlab.progress import progress_bar as bar

    return bar(console, TextColumn("{task.fields[rate]}"))


def exact_eif(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sample],
              columns: Sequence[Sample], peft: PeftSpec, schedule: Schedule = Schedule(),
              seeds: Sequence[int] = (0,), console: Console | None = None) -> EIFResult:
    """The exact EIF matrix: for each seed, wrap ``model`` once, score every column at θ_0,
    then for each row sample fine-tune on it alone (reset in memory first) and score every
    column at θ_i. Returns an EIFResult (see there for shapes).

    ``model`` is changed in place while this runs and handed back unwrapped at the end (the
    adapter removed; a tied embedding stays untied when the targets include lm_head/embed).
    Runs under deterministic torch kernels, so on CPU the same inputs give the same bits.
    """
    if not rows or not columns:
        raise FactlabError("influence needs at least one row sample and one column sample")
    pairs = [scored_pair(c, tokenizer) for c in columns]
    for r in rows:  # tokenize every row up front: a sample with nothing to score fails now
        sample_tokens(tokenizer, r)
    n_s, n_r, n_c = len(seeds), len(rows), len(columns)
    eif = np.zeros((n_s, n_r, n_c))
    base = np.zeros((n_s, n_c))
    train_loss = np.zeros((n_s, n_r, schedule.steps))
    row_seconds = np.zeros((n_s, n_r))
    trainable = 0
    t0 = time.perf_counter()
    with deterministic(), progress_bar(console) as progress:
        task = progress.add_task("influence rows", total=n_s * n_r, rate="")
        for s, seed in enumerate(seeds):
            trainer = RowTrainer(model, tokenizer, peft, schedule, seed)
            trainable = trainer.trainable_params
            try:
                base[s] = column_losses(trainer.model, tokenizer, pairs, schedule.batch_size)
                for i, sample in enumerate(rows):
                    t_row = time.perf_counter()
                    train_loss[s, i] = trainer.fit(sample)
                    eif[s, i] = column_losses(trainer.model, tokenizer, pairs, schedule.batch_size) - base[s]
                    row_seconds[s, i] = time.perf_counter() - t_row
                    progress.update(task, advance=1, rate=f"{row_seconds[s, :i + 1].mean():.2f} s/row")
            finally:
                model = trainer.release()
    return EIFResult([r.id for r in rows], [c.id for c in columns], list(seeds), eif, base, train_loss,
                     row_seconds, time.perf_counter() - t0, trainable)
