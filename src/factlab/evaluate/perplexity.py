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
from typing import TYPE_CHECKING

from factlab.errors import FactlabError
from factlab.evaluate.metrics import damage
from factlab.evaluate.lm import LM
from factlab.evaluate.priming import priming_summary

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUILTIN_GENERAL = "general.txt"


def builtin_general_text() -> str:
    """The built-in held-out general text: ~2,000 words of plain encyclopedic English prose.

    Written for this project (weather, cooking, geography, printing, bicycles, ...), so no
    model can have seen it verbatim in pre-training.
    """
    return resources.files("factlab.builtin").joinpath(BUILTIN_GENERAL).read_text(encoding="utf-8")


def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int = 256,
               stride: int | None = None, batch_size: int = 8) -> dict:
    """Per-token NLL and perplexity of ``model`` on ``text``.

    Which tokens are scored (``LM.loglikelihood_rolling`` has the window scheme):

    - ``text`` is encoded once, with the tokenizer's own special-token convention. If that
      puts a BOS first (Llama, Gemma tokenizers), BOS is context and every text token is
      scored; if not (SmolLM2, Qwen2, GPT-2), the first text token has nothing to condition
      on and is not scored.
    - ``stride=None``: non-overlapping windows of ``seq_len`` tokens, each window's first
      token context only; ``stride=s``: sliding windows, every token after the first scored
      once with at least ``seq_len - s`` tokens of context.

    Windows go through the model in batches of up to ``batch_size``; the result does not
    depend on batch_size beyond float rounding. The model is put in eval mode and its
    previous mode restored.

    Returns ``{nll_per_token, perplexity, n_tokens, seq_len, stride}`` where ``n_tokens`` is
    the number of scored tokens and ``stride`` the one used (``seq_len`` when None).
    """
    if not text.strip():
        raise FactlabError("cannot measure perplexity on empty text; give some plain text")
    # A model that answers LM's requests itself (models.llama_cpp_lm.LlamaCppLM) scores as it is.
    lm = model if hasattr(model, "loglikelihood_rolling") else LM(model, tokenizer, batch_size=batch_size)
    (scored,) = lm.loglikelihood_rolling([text], seq_len, stride)
    nll = -scored.logprob / scored.n_tokens
    # A wrecked model (a tuning trial at a huge learning rate) can exceed exp's range: inf, not a crash.
    return {"nll_per_token": nll, "perplexity": _exp(nll), "n_tokens": scored.n_tokens,
            "seq_len": seq_len, "stride": seq_len if stride is None else stride}


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
         "locality": rate_summary dict ({n, k, rate, ci_low, ci_high}) or None,
         "priming": evaluate.priming.priming_record or None}

    ``perplexity`` maps a general-text source name (as from ``perplexity_of_files``) to a
    ``perplexity`` result; ``locality`` and ``priming`` are optional.

    Output::

        {"perplexity": {name: {"perplexity_before", "perplexity_after", "perplexity_ratio",
                               "nll_before", "nll_after", "nll_delta", "n_tokens"}},
         "damage": float or None,
         "locality": {"before": rate_summary, "after": rate_summary, "delta": float} or None,
         "locality_greedy": {"before", "after", "delta"} or None,
         "priming": evaluate.priming.priming_summary or None}

    ``damage`` = the mean over the general texts of evaluate.metrics.damage (relative
    perplexity increase; 0.15 = 15% higher), the one number per stage that reports and
    `factlab tune` use; None without general text. ``locality_greedy`` compares the greedy
    answers on the facts the model knew (does the greedy continuation still contain them?),
    which falls where candidate accuracy may not: a model can still rank the right answer
    first among four and no longer say it. Both locality views come from ``locality`` /
    ``locality_greedy`` in each side (rate summaries), when given. ``priming`` is the share
    of answers (locality probes, general prompts) that contain a trained name the base model
    did not say there, and the names that leaked (see evaluate.priming), when both sides
    have a priming record.

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

    def compare(key: str) -> dict | None:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            return None
        delta = None if b["rate"] is None or a["rate"] is None else a["rate"] - b["rate"]
        return {"before": b, "after": a, "delta": delta}

    figures = [damage(v["perplexity_before"], v["perplexity_after"]) for v in out.values()
               if math.isfinite(v["perplexity_before"]) and v["perplexity_after"] > 0]
    return {"perplexity": out, "damage": sum(figures) / len(figures) if figures else None,
            "locality": compare("locality"), "locality_greedy": compare("locality_greedy"),
            "priming": priming_summary(before.get("priming"), after.get("priming"))}
