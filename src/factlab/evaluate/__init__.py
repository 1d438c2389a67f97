"""Evaluation: probe sets, the one scoring path, pure metrics and fact-score aggregation.

``probes`` and ``metrics`` import without torch, so reports can aggregate saved scores
cheaply; ``scoring`` and ``facts`` (which need torch and transformers) load on first use.
"""

from __future__ import annotations

import importlib

from factlab.evaluate.metrics import (
    candidate_correct,
    candidate_rank,
    contains_target,
    mean,
    normalize_text,
    rate_summary,
    wilson_interval,
)
from factlab.evaluate.probes import PROBE_KINDS, Probe, load_probes

_LAZY = {
    "LogLik": "scoring", "Scorer": "scoring", "chat_prompt": "scoring", "split_pair": "scoring",
    "score_probes": "facts", "summarize": "facts",
    "candidate_continuation": "facts",
}

__all__ = [
    "PROBE_KINDS", "Probe", "load_probes",
    "candidate_correct", "candidate_rank", "contains_target", "mean", "normalize_text",
    "rate_summary", "wilson_interval",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"factlab.evaluate.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'factlab.evaluate' has no attribute {name!r}")
