"""The anchor: KL(p_base || p_model) on general text in every training step.

Replay (cross-entropy on general text) pulls the model toward the replayed *samples*; the
damage figure (factlab.evaluate.perplexity) measures how far the model's *distribution* on
general text moved. The anchor acts on that directly: each training step draws a few blocks of
general text (`train.anchor.ratio` blocks per example of the step, seeded), and adds

    kl * mean over the blocks' positions of  sum_v p_base(v | prefix) * (log p_base - log p_model)

to the stage's loss. Every position counts (a next-token distribution needs no label), over
the full vocabulary (Marek et al. 2025, arXiv 2605.26097: full-vocabulary KL on replay text
"nearly eliminates forgetting").

Where p_base comes from:
- adapter methods that change weights (lora, rslora, dora, ia3): the same model with its
  adapter switched off (peft's `disable_adapter()`), so no second model is held in memory;
  the base pass runs without gradients on the same blocks, right before the student pass.
- full fine-tuning (the weights themselves move): the starting model's distributions are
  computed once before the first step for every block the stage will draw, and kept as the
  top `TOP_K` log-probabilities per position plus the mass of the rest (the tail). The KL over
  those k+1 outcomes is a lower bound of the full KL (merging outcomes never increases a KL);
  loss.topk_kl, shared with self-distillation; tests/test_distill.py measures the gap.
- prompt methods (prompt / prefix / P-tuning) change no weights and are refused.

Memory stays flat: the student's logits are computed in chunks of rows through lm_head with
their gradients taken chunk by chunk (factlab.train.loss.ChunkedHeadLoss, as the fused loss),
and the base logits of a chunk are computed only when that chunk is.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext

import torch

from factlab.config import AnchorSpec
from factlab.data.corpus import pack_documents
from factlab.errors import FactlabError
from factlab.train.loss import CHUNK_ELEMENTS, ChunkedHeadLoss, body_and_head, full_kl, hf_model, topk_kl, topk_targets

TOP_K = 64
"""Base log-probabilities kept per position for full fine-tuning (see the module docstring)."""


def anchor_blocks(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """(n, seq_len) token ids: `docs` joined with EOS and cut into full blocks."""
    blocks = [b["input_ids"] for b in pack_documents(tokenizer, docs, seq_len) if len(b["input_ids"]) == seq_len]
    if not blocks:
        raise FactlabError(f"train.anchor: its text gives no block of {seq_len} tokens; "
                           "give more text (anchor.source) or a smaller anchor.seq_len")
    return torch.tensor(blocks, dtype=torch.long)


class Anchor:
    """The anchor term of one stage: `term(model)` draws this call's blocks and returns the mean
    per-position KL (a scalar that carries gradients to the trained parameters)."""

    def __init__(self, model, blocks: torch.Tensor, spec: AnchorSpec, rows_per_call: int, calls: int,
                 seed: int, autocast=None):
        cfg = getattr(model, "active_peft_config", None)
        if cfg is not None and getattr(cfg, "is_prompt_learning", False):
            raise FactlabError(f"train.anchor: {str(cfg.peft_type.value).lower()} changes no weights of the "
                               "model, so there is no base to switch to; remove train.anchor")
        self.spec = spec
        self.blocks = blocks
        self.per_call = max(1, round(spec.ratio * rows_per_call))
        self.autocast = autocast or nullcontext
        order = list(range(len(blocks)))
        random.Random(seed).shuffle(order)
        self.order, self.pos = order, 0
        hf = hf_model(model)
        self.body, self.head = body_and_head(hf)
        if self.body is None:
            raise FactlabError(f"train.anchor: {type(hf).__name__} has no separate body and output head; "
                               "remove train.anchor")
        self.chunk_rows = max(1, CHUNK_ELEMENTS // max(1, self.head.weight.shape[0]))
        self.adapter_off = cfg is not None
        # The PeftModel itself: what compute_loss is handed may be a wrapper of it (DDP) that
        # has no disable_adapter().
        self.model = model
        self.cached: dict[int, tuple[torch.Tensor, ...]] = {}
        if not self.adapter_off:
            self._precompute(model, min(len(blocks), calls * self.per_call))
        self.last: float | None = None

    def _next(self) -> list[int]:
        picks = []
        for _ in range(self.per_call):
            picks.append(self.order[self.pos % len(self.order)])
            self.pos += 1
        return picks

    @torch.no_grad()
    def _precompute(self, model, n: int) -> None:
        """Full fine-tuning: the starting model's top-k per position of the first n blocks of
        the draw order (the ones the stage will use; it cycles through them)."""
        was = model.training
        model.eval()
        try:
            for i in self.order[:n]:
                ids = self.blocks[i:i + 1].to(self.head.weight.device)
                with self.autocast():
                    hidden = self.body(input_ids=ids, use_cache=False)[0][0]
                parts = [topk_targets(self.head(hidden[s:s + self.chunk_rows]), TOP_K)
                         for s in range(0, hidden.shape[0], self.chunk_rows)]
                self.cached[i] = tuple(torch.cat(x) for x in zip(*parts))  # (log-probs, ids, log tail)
        finally:
            model.train(was)

    def __call__(self, model=None) -> torch.Tensor:
        """`model`: unused (the anchor holds the model it was built for); kept so callers can
        pass what they train."""
        picks = self._next()
        ids = self.blocks[picks].to(self.head.weight.device)
        n_rows = ids.numel()
        if self.adapter_off:
            with torch.no_grad(), self.model.disable_adapter(), self.autocast():
                base_hidden = self.body(input_ids=ids, use_cache=False)[0].reshape(n_rows, -1)

            def chunk_loss(logits, start, end):
                with torch.no_grad(), self.model.disable_adapter(), self.autocast():
                    base_logits = self.head(base_hidden[start:end])
                return full_kl(base_logits, logits).sum()
        else:
            top, idx, tail = (torch.cat([self.cached[i][j] for i in picks]).to(ids.device) for j in range(3))

            def chunk_loss(logits, start, end):
                return topk_kl(logits, top[start:end], idx[start:end], tail[start:end]).sum()

        params = [p for p in self.head.parameters() if p.requires_grad]
        with self.autocast():  # the head runs under autocast too, as in the fused loss
            hidden = self.body(input_ids=ids, use_cache=False)[0].reshape(n_rows, -1)
            if torch.is_grad_enabled() and (hidden.requires_grad or params):
                total = ChunkedHeadLoss.apply(hidden, chunk_loss, self.head, self.chunk_rows, *params)
            else:
                total = sum((chunk_loss(self.head(hidden[s:s + self.chunk_rows]).float(), s,
                                        min(n_rows, s + self.chunk_rows))
                             for s in range(0, n_rows, self.chunk_rows)), torch.zeros((), device=ids.device))
        kl = total / n_rows
        self.last = float(kl.detach())
        if not math.isfinite(self.last):
            raise FactlabError("train.anchor: the KL to the base model is not finite; lower the learning rate")
        return kl
