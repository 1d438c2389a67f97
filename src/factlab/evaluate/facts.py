"""Fact scoring: run a probe set through a model, then aggregate and tabulate the rows.

``score_probes`` is the step run before and after every training stage. It produces one row
per probe (plain dicts, ready for the run store); ``summarize`` and ``summary_table`` are pure
functions over saved rows, so comparing stages never needs the model again.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from rich.table import Table

from factlab.errors import FactlabError
from factlab.evaluate.metrics import (
    candidate_correct,
    candidate_rank,
    contains_target,
    mean,
    rate_summary,
)
from factlab.evaluate.probes import PROBE_KINDS, Probe
from factlab.evaluate.scoring import Scorer, chat_prompt, trailing_space

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _joins_without_space(c: str) -> bool:
    """Whether text after character ``c`` follows without a space: CJK ideographs, kana and
    full-width forms (scripts written without spaces between words), or opening brackets
    and quotes. Hangul is wide too but Korean separates words with spaces."""
    if unicodedata.category(c) in ("Ps", "Pi"):
        return True
    return (unicodedata.east_asian_width(c) in ("W", "F")
            and not unicodedata.name(c, "").startswith("HANGUL"))


def candidate_continuation(probe: Probe, candidate: str) -> str:
    """The continuation string scored for ``candidate`` after ``probe``'s prompt.

    ``qa``: the assistant's answer text as given (the chat prompt ends the turn header with
    a newline). Other kinds: " " + candidate, so the continuation carries the word boundary,
    unless the prompt already ends with whitespace (split_pair moves it over), the candidate
    starts with whitespace, or the prompt ends in a script or bracket that takes no space.
    """
    if probe.kind == "qa" or candidate[:1].isspace():
        return candidate
    last = probe.prompt[-1]
    if last.isspace() or _joins_without_space(last):
        return candidate
    return " " + candidate


def score_probes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 probes: Sequence[Probe], *, batch_size: int = 16,
                 greedy_tokens: int | None = None) -> list[dict]:
    """Score every probe: candidate log-probs, rank, correctness and a greedy continuation.

    All candidates of all probes go through one batched ``Scorer.loglikelihood`` call and all
    greedy continuations through one ``generate_greedy`` call, with ``greedy_tokens`` new
    tokens (default: the longest target's token count + 4).
    """
    if not probes:
        return []
    if greedy_tokens is not None and greedy_tokens < 1:
        raise FactlabError(f"greedy_tokens must be at least 1, got {greedy_tokens}; "
                           "leave it unset for the default")
    scorer = Scorer(model, tokenizer, batch_size=batch_size)
    contexts = [chat_prompt(tokenizer, p.prompt) if p.kind == "qa" else p.prompt for p in probes]

    pairs: list[tuple[str, str]] = []
    starts: list[int] = []  # index in pairs of each probe's target; distractors follow it
    for probe, context in zip(probes, contexts):
        starts.append(len(pairs))
        pairs += [(context, candidate_continuation(probe, c))
                  for c in [probe.target, *probe.distractors]]
    scores = scorer.loglikelihood(pairs)

    # Generate from the prompt without its trailing spaces, as it was scored: the space
    # belongs to the next word's token.
    gen_prompts = [c if p.kind == "qa" else c[:len(c) - trailing_space(c)]
                   for p, c in zip(probes, contexts)]
    max_new = greedy_tokens or max(scores[s].n_tokens for s in starts) + 4
    greedy = scorer.generate_greedy(gen_prompts, max_new)

    rows = []
    for probe, start, text in zip(probes, starts, greedy):
        target = scores[start]
        distractor_means = [s.mean_logprob
                            for s in scores[start + 1:start + 1 + len(probe.distractors)]]
        rows.append({
            "id": probe.id,
            "fact": probe.fact,
            "kind": probe.kind,
            "prompt": probe.prompt,
            "target": probe.target,
            "distractors": list(probe.distractors),
            "target_logprob": target.logprob,
            "target_mean_logprob": target.mean_logprob,
            "target_tokens": target.n_tokens,
            "target_is_greedy": target.is_greedy,
            "distractor_mean_logprobs": distractor_means,
            "correct": candidate_correct(target.mean_logprob, distractor_means),
            "rank": candidate_rank(target.mean_logprob, distractor_means),
            "greedy": text,
            "greedy_match": contains_target(text, probe.target),
        })
    return rows


def _summary(rows: Sequence[Mapping]) -> dict:
    ranked = [r for r in rows if r["correct"] is not None]  # probes with distractors
    return {
        "n": len(rows),
        "accuracy": rate_summary([r["correct"] for r in ranked]),
        "greedy_match": rate_summary([r["greedy_match"] for r in rows]),
        "mean_target_logprob": mean([r["target_logprob"] for r in rows]),
        "mean_target_mean_logprob": mean([r["target_mean_logprob"] for r in rows]),
        "mean_rank": mean([r["rank"] for r in ranked]),
    }


def _kind_order(kinds) -> list[str]:
    """Known kinds in PROBE_KINDS order, any others after them, then "all"."""
    kinds = set(kinds) - {"all"}
    return ([k for k in PROBE_KINDS if k in kinds] + sorted(kinds - set(PROBE_KINDS)) + ["all"])


def summarize(rows: Sequence[Mapping]) -> dict[str, dict]:
    """Per kind and for "all": n, accuracy and greedy_match (rate summaries with 95% CI),
    mean target log-prob (sum and per token) and mean rank. Accuracy and mean rank count only
    probes with distractors; they are None/n=0 for kinds that have none."""
    out = {}
    for kind in _kind_order(r["kind"] for r in rows):
        out[kind] = _summary([r for r in rows if kind == "all" or r["kind"] == kind])
    return out


def _fmt_rate(rs: Mapping | None) -> str:
    if not rs or rs["n"] == 0:
        return "-"
    return f"{rs['rate']:.2f} [{rs['ci_low']:.2f},{rs['ci_high']:.2f}]"


def summary_table(summaries: Mapping[str, Mapping[str, Mapping]], title: str) -> Table:
    """A rich table of ``{stage: summarize(rows)}``: one column per stage, and per probe kind
    a row for candidate accuracy and one for greedy match, as "rate [95% CI]"; n is in the
    metric column (the same probes are scored at every stage)."""
    table = Table(title=title)
    table.add_column("kind")
    table.add_column("metric (n)")
    for stage in summaries:
        table.add_column(stage, justify="right")
    kinds = _kind_order(k for s in summaries.values() for k in s)
    for i, kind in enumerate(kinds):
        for metric, label in (("accuracy", "accuracy"), ("greedy_match", "greedy match")):
            stats = [s.get(kind, {}).get(metric) for s in summaries.values()]
            n = max((st["n"] for st in stats if st), default=0)
            table.add_row(kind if metric == "accuracy" else "", f"{label} ({n})", *map(_fmt_rate, stats),
                          style="bold" if kind == "all" else None,
                          end_section=metric == "greedy_match" and i < len(kinds) - 1)
    return table
