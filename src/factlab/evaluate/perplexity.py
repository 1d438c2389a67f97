"""Perplexity on held-out general text, and the forgetting summary of two saved measurements.

Forgetting is measured as a function of two saved summaries (before, after), never inside a
training loop: ``perplexity`` / ``perplexity_of_files`` produce the numbers, and
``forgetting_summary`` compares them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from factlab.errors import FactlabError

BUILTIN_GENERAL = "general.txt"


def builtin_general_text() -> str:
    """The built-in held-out general text: ~2,000 words of plain encyclopedic English prose.

    Written for this project (weather, cooking, geography, printing, bicycles, ...), so no
    model can have seen it verbatim in pre-training.
    """
    return resources.files("factlab.builtin").joinpath(BUILTIN_GENERAL).read_text(encoding="utf-8")


def _max_positions(model) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
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


@torch.inference_mode()
def _window_nlls(model, ids: list[int], windows, batch_size: int, device) -> tuple[float, int]:
    """Sum of NLL (float64) and count over the scored tokens of all windows."""
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
        input_ids = torch.tensor([ids[s:e] for s, e, _ in batch], dtype=torch.long, device=device)  # (B, T)
        logits = model(input_ids=input_ids).logits  # (B, T, V)
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
    return total, count


def perplexity(model, tokenizer, text: str, seq_len: int = 256, stride: int | None = None, batch_size: int = 8) -> dict:
    """Per-token NLL and perplexity of ``model`` on ``text``.

    Which tokens are scored:

    - ``text`` is encoded once, with the tokenizer's own special-token convention
      (``add_special_tokens=True``). If that puts a BOS first (Llama, Gemma tokenizers), BOS
      is context and every text token is scored; if not (SmolLM2, Qwen2, GPT-2), the first
      text token has nothing to condition on and is not scored.
    - ``stride=None``: non-overlapping windows [0, L), [L, 2L), ... of ``seq_len`` = L tokens.
      Each window's first token is context only (not scored), so one token per window
      boundary is never scored; every other token is scored once.
    - ``stride=s`` (1 <= s <= L): sliding windows starting at 0, s, 2s, ...; each window
      scores only the tokens after the previous window's end, so every token after the first
      is scored exactly once, with at least L - s tokens of context (the Hugging Face
      "perplexity of fixed-length models" scheme). Costs about L / s times as much.

    Windows go through the model in batches of up to ``batch_size`` under inference mode;
    log-softmax in fp32 and sums in float64, so the result does not depend on batch_size
    beyond float rounding. The model is put in eval mode and its previous mode restored.

    Returns ``{nll_per_token, perplexity, n_tokens, seq_len, stride}`` where ``n_tokens`` is
    the number of scored tokens and ``stride`` the one used (``seq_len`` when None).
    """
    if not text.strip():
        raise FactlabError("cannot measure perplexity on empty text; give some plain text")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_pos = _max_positions(model)
    if max_pos is not None and seq_len > max_pos:
        raise FactlabError(f"seq_len {seq_len} is longer than the model's context ({max_pos} tokens); use seq_len <= {max_pos}")

    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    windows = _windows(len(ids), seq_len, stride)
    if not windows:
        raise FactlabError("text is too short to measure perplexity (needs at least 2 tokens); give a longer text")

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        total, count = _window_nlls(model, ids, windows, batch_size, device)
    finally:
        model.train(was_training)
    nll = total / count
    # A wrecked model (a tuning trial at a huge learning rate) can exceed exp's range: inf, not a crash.
    return {"nll_per_token": nll, "perplexity": _exp(nll), "n_tokens": count, "seq_len": seq_len, "stride": stride}


def _exp(x: float) -> float:
    """exp(x), inf beyond float range (a perplexity of a wrecked model)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _read_general_text(path: Path) -> str:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FactlabError(f"general text file {path} {what}; give the path of a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FactlabError(f"general text file {path} is not UTF-8 text; re-save it as UTF-8") from None
    if not text.strip():
        raise FactlabError(f"general text file {path} is empty; put some plain text in it or leave it out")
    return text


def perplexity_of_files(model, tokenizer, paths: Sequence[str | Path], **kwargs) -> dict[str, dict]:
    """``{file name: perplexity(...)}`` for each general-text file; ``kwargs`` go to ``perplexity``.

    All files are read (and checked) before the model runs, so a bad path fails fast. Keys are
    file names (``path.name``), so two files with the same name are an error.
    """
    texts: dict[str, str] = {}
    for p in paths:
        path = Path(p).expanduser()
        if path.name in texts:
            raise FactlabError(f"two general text files are named {path.name}; rename one so results can be told apart")
        texts[path.name] = _read_general_text(path)
    return {name: perplexity(model, tokenizer, text, **kwargs) for name, text in texts.items()}


def forgetting_summary(before: dict, after: dict) -> dict:
    """Compare two saved measurements of the same model, before and after fine-tuning.

    Input structure (each of ``before`` and ``after``)::

        {"perplexity": {name: {"nll_per_token": float, "perplexity": float, "n_tokens": int, ...}},
         "locality": rate_summary dict ({n, k, rate, ci_low, ci_high}) or None}

    ``perplexity`` maps a general-text source name (as from ``perplexity_of_files``) to a
    ``perplexity`` result; ``locality`` is optional.

    Output::

        {"perplexity": {name: {"perplexity_before", "perplexity_after", "perplexity_ratio",
                               "nll_before", "nll_after", "nll_delta", "n_tokens"}},
         "locality": {"before": rate_summary, "after": rate_summary, "delta": float} or None}

    ``perplexity_ratio`` = after / before (> 1: the model got worse at general text);
    ``nll_delta`` = after - before, in nats per token (so ratio = exp(nll_delta)).
    ``locality.delta`` = after rate - before rate (< 0: unrelated facts were lost), None if
    either rate is None (no items); ``locality`` itself is None unless both sides have one.
    The two sides must have measured the same sources with the same number of scored
    tokens (FactlabError otherwise).
    """
    ppl_b, ppl_a = before.get("perplexity") or {}, after.get("perplexity") or {}
    if set(ppl_b) != set(ppl_a):
        only_b, only_a = sorted(set(ppl_b) - set(ppl_a)), sorted(set(ppl_a) - set(ppl_b))
        raise FactlabError(
            f"before and after measured different general texts (only before: {only_b}, only after: {only_a}); "
            "measure both with the same files"
        )
    out: dict[str, dict] = {}
    for name in sorted(ppl_b):
        b, a = ppl_b[name], ppl_a[name]
        if b["n_tokens"] != a["n_tokens"]:
            raise FactlabError(
                f"general text {name}: before scored {b['n_tokens']} tokens, after {a['n_tokens']}; "
                "measure both with the same text, tokenizer and seq_len/stride"
            )
        out[name] = {
            "perplexity_before": b["perplexity"],
            "perplexity_after": a["perplexity"],
            "perplexity_ratio": _exp(a["nll_per_token"] - b["nll_per_token"]),
            "nll_before": b["nll_per_token"],
            "nll_after": a["nll_per_token"],
            "nll_delta": a["nll_per_token"] - b["nll_per_token"],
            "n_tokens": b["n_tokens"],
        }
    loc_b, loc_a = before.get("locality"), after.get("locality")
    locality = None
    if loc_b is not None and loc_a is not None:
        delta = None if loc_b["rate"] is None or loc_a["rate"] is None else loc_a["rate"] - loc_b["rate"]
        locality = {"before": loc_b, "after": loc_a, "delta": delta}
    return {"perplexity": out, "locality": locality}
