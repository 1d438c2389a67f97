"""Whole texts scored in windows: the work of ``LM.loglikelihood_rolling`` (perplexity).

``rolling_windows`` plans which tokens each window scores; ``rolling`` runs one token stream's
windows through the model and sums the scored tokens' log-probs.
"""

from __future__ import annotations

import torch

from factlab.evaluate.hfmodel import HFModel
from factlab.evaluate.interface import RollingLogLik


def rolling_plan(tokenizer, texts, seq_len: int, stride: int | None, context: int | None,
                 runtime: str) -> tuple[list[list[int]], list[list[tuple[int, int, int]]]]:
    """(token streams, windows of each) for ``loglikelihood_rolling`` of any backend: the
    checks of its arguments (ValueError for a bad seq_len/stride, FactlabError for a seq_len
    beyond the `context` of `runtime` or a text of fewer than 2 tokens), then the texts'
    tokens (a text given as ids is taken as it is) and ``rolling_windows`` of each."""
    from factlab.errors import FactlabError
    from factlab.evaluate.tokens import encode

    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if context is not None and seq_len > context:
        raise FactlabError(f"seq_len {seq_len} is longer than {runtime} context ({context} tokens); "
                           f"use seq_len <= {context}")
    streams = [encode(tokenizer, t) if isinstance(t, str) else list(t) for t in texts]
    plans = [rolling_windows(len(ids), seq_len, stride) for ids in streams]
    if any(not windows for windows in plans):
        raise FactlabError("text is too short to score (needs at least 2 tokens); give a longer text")
    return streams, plans


def rolling_windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, score_from)`` for a stream of n tokens: window [start, end) scores
    tokens [score_from, end), predicting each from the window's earlier tokens."""
    windows = []
    prev_end = 0
    start = 0
    while True:
        end = min(start + seq_len, n)
        # A window cannot score its own first token (nothing before it in the window), and
        # tokens an earlier window scored are context only.
        score_from = max(prev_end, start + 1)
        if score_from < end:
            windows.append((start, end, score_from))
        if end == n:
            return windows
        prev_end = end
        start += stride


def rolling(hf: HFModel, ids: list[int], windows: list[tuple[int, int, int]], batch_size: int) -> RollingLogLik:
    """Sum of log-probs (float64) and count over the scored tokens of all ``windows`` of the
    token stream ``ids``; the caller holds the model in ``eval_mode``."""
    total, count = 0.0, 0
    # Only windows of equal length share a batch (no padding): the full windows, then the
    # shorter last one alone. Padding would be correct for a causal model but can change
    # the numbers in the last bits, and the result should not depend on batch_size.
    i = 0
    while i < len(windows):
        length = windows[i][1] - windows[i][0]
        j = i
        while j < len(windows) and j - i < batch_size and windows[j][1] - windows[j][0] == length:
            j += 1
        batch = windows[i:j]
        input_ids = torch.tensor([ids[s:e] for s, e, _ in batch], dtype=torch.long, device=hf.device)  # (B, T)
        logits = hf.forward(input_ids=input_ids)  # (B, T, V)
        for b, (start, end, score_from) in enumerate(batch):
            # Position p predicts token p + 1: scored tokens [score_from, end) in stream
            # coordinates come from logits at window positions [score_from-1-start, end-1-start).
            lo, hi = score_from - 1 - start, end - 1 - start
            logp = torch.log_softmax(logits[b, lo:hi].float(), dim=-1)  # (S, V), fp32
            targets = input_ids[b, lo + 1 : hi + 1]  # (S,)
            nll = -logp.gather(-1, targets[:, None]).squeeze(-1)  # (S,)
            total += float(nll.double().sum())
            count += hi - lo
        i = j
    return RollingLogLik(-total, count)
