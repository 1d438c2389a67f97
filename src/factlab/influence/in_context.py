"""In-context influence, the paper's "prompting partly rescues": no training, sample i in the
prompt instead.

    EIF_ctx[i, j] = L_j(sample i placed in the prompt before j) − L_j(θ_0)

from the same Scorer as the exact matrix. The prompt layout, exactly (``scored_pair`` with a
context; SEP = ``CONTEXT_SEPARATOR`` = two newlines, the separator the in-context baseline of
``factlab run`` uses):

    plain column j (a probe, a prompt/target pair):  context = text_i + SEP + prompt_j,
                                                     continuation = target_j
    document column j (empty prompt):                context = text_i + SEP,
                                                     continuation = text_j (all of it scored)
    chat column j (Q&A):                             context = chat template of the user turn
                                                     (text_i + SEP + question_j),
                                                     continuation = answer_j

text_i = ``sample_text(sample_i)``: prompt + target (a chat sample: question, newline, answer;
no chat template). BOS: the whole context is tokenized once with the tokenizer's default
special tokens, so a tokenizer that adds BOS puts it once, before text_i, never between text_i
and j; SmolLM2's adds none, and then no BOS appears at all (without context, a document is
scored after a BOS stand-in instead: the baseline and the in-context score differ in that
first token's context too). The trailing newlines of ``text_i + SEP`` stay in the context
(``split_pair``), so the scored tokens are exactly j's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from factlab.influence.exact import column_losses, deterministic, progress_bar
from factlab.influence.samples import Sample, sample_text, scored_pair

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class ContextResult:
    """eif[i, j] = L_j(row i in the prompt) − L_j(no context), (R, C) float64 nats per token;
    base_loss (C,) = L_j(θ_0); row_seconds (R,); seconds: the whole matrix."""

    row_ids: list[str]
    col_ids: list[str]
    eif: np.ndarray
    base_loss: np.ndarray
    row_seconds: np.ndarray
    seconds: float


def context_pairs(row: Sample, columns: Sequence[Sample],
                  tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, str]]:
    """The (context, continuation) pairs of one in-context row, in the layout above."""
    text = sample_text(row)
    return [scored_pair(c, tokenizer, context=text) for c in columns]


def in_context_eif(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sample],
                   columns: Sequence[Sample], batch_size: int = 16, base_loss: np.ndarray | None = None,
                   console: Console | None = None) -> ContextResult:
    """The in-context influence matrix: every column scored once without context (unless
    ``base_loss`` (C,) is given, e.g. the exact matrix's L_j(θ_0)) and once after each row's
    text. One batched Scorer pass per row."""
    t0 = time.perf_counter()
    eif = np.zeros((len(rows), len(columns)))
    row_seconds = np.zeros(len(rows))
    with deterministic(), progress_bar(console) as progress:
        if base_loss is None:
            base_loss = column_losses(model, tokenizer, [scored_pair(c, tokenizer) for c in columns], batch_size)
        task = progress.add_task("in-context rows", total=len(rows), rate="")
        for i, row in enumerate(rows):
            t_row = time.perf_counter()
            eif[i] = column_losses(model, tokenizer, context_pairs(row, columns, tokenizer), batch_size) - base_loss
            row_seconds[i] = time.perf_counter() - t_row
            progress.update(task, advance=1, rate=f"{row_seconds[:i + 1].mean():.2f} s/row")
    return ContextResult([r.id for r in rows], [c.id for c in columns], eif, np.asarray(base_loss, dtype=np.float64),
                         row_seconds, time.perf_counter() - t0)
