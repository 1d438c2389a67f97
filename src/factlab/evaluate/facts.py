"""Fact scoring: run a probe set through a model, then aggregate and tabulate the rows.

``score_probes`` is the step run before and after every training stage. It produces one row
per probe (plain dicts, ready for the run store); ``summarize`` is a pure function over saved
rows, so comparing stages never needs the model again (report/console.py tabulates them).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from factlab.errors import FactlabError
from factlab.evaluate.metrics import (
    candidate_correct,
    candidate_rank,
    contains_target,
    mean,
    rate_summary,
)
from factlab.evaluate.probes import Probe, order_kinds
from factlab.evaluate.lm import LM, Completion, PromptRequest
from factlab.evaluate.tokens import chat_prompt, trailing_space
from factlab.evaluate.textmetrics import bootstrap_mean_interval, eos_summary

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CONTEXT_SEPARATOR = "\n\n"
"""Between the documents placed before a prompt (the in-context baseline) and the prompt; the
self-distillation teacher (factlab.train.distill) and the influence samples use the same."""


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


def probe_context(probe: Probe, tokenizer, context: str | None = None) -> str:
    """The text a probe's candidates are scored after.

    ``qa``: the question as a user turn in the chat template. Others: the prompt. With
    ``context`` (the in-context baseline), the source text comes first: before the prompt, or
    at the top of the user turn.
    """
    if probe.kind == "qa":
        question = f"{context}{CONTEXT_SEPARATOR}{probe.prompt}" if context else probe.prompt
        return chat_prompt(tokenizer, question)
    return f"{context}{CONTEXT_SEPARATOR}{probe.prompt}" if context else probe.prompt


def score_probes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 probes: Sequence[Probe], *, batch_size: int = 16,
                 greedy_tokens: int | None = None, qa_tokens: int = 48,
                 samples: int = 0, temperature: float = 0.9, sample_tokens: int = 24,
                 seed: int = 0, context: str | None = None) -> list[dict]:
    """Score every probe: candidate log-probs, rank, correctness, a greedy continuation and,
    with ``samples`` > 0, that many sampled continuations at ``temperature``.

    One model interface (``LM``) does it all, in one ``LM.complete`` call: each probe's prompt
    runs through the model once, for its candidates, its greedy continuation (which starts
    after the target's tokens when they are the model's argmax) and its samples.
    Greedy continuations get ``greedy_tokens`` new tokens (default: the longest target's
    token count + 4); ``qa`` answers get ``qa_tokens``, enough to see whether the model ends
    its turn with EOS. ``context`` puts a source text before every prompt (the in-context
    baseline: could the model use the fact at all?). ``probe_requests`` and ``probe_rows``
    are the two halves, for a caller that adds requests of its own to the same call.
    """
    if not probes:
        return []
    lm = LM(model, tokenizer, batch_size=batch_size)
    requests = probe_requests(lm, probes, greedy_tokens=greedy_tokens, qa_tokens=qa_tokens, samples=samples,
                              context=context)
    # Generation batches are wider than scoring ones: a decoding step multiplies one token per
    # row by every weight, which a CPU does well only with a few hundred rows.
    done = lm.complete(requests, temperature=temperature, sample_tokens=sample_tokens, seed=seed,
                       gen_batch=max(512, batch_size))
    return probe_rows(probes, done)


def probe_requests(lm: LM, probes: Sequence[Probe], *, greedy_tokens: int | None = None, qa_tokens: int = 48,
                   samples: int = 0, context: str | None = None) -> list[PromptRequest]:
    """The ``LM.complete`` request of each probe (see ``score_probes``)."""
    if greedy_tokens is not None and greedy_tokens < 1:
        raise FactlabError(f"greedy_tokens must be at least 1, got {greedy_tokens}; "
                           "leave it unset for the default")
    contexts = [probe_context(p, lm.tokenizer, context) for p in probes]
    continuations = [tuple(candidate_continuation(p, c) for c in [p.target, *p.distractors]) for p in probes]
    if greedy_tokens is None and probes:
        targets = lm.tokenize_pairs([(ctx, conts[0]) for ctx, conts in zip(contexts, continuations)])
        greedy_tokens = max(len(cont) for _, cont in targets) + 4
    # Generate from the prompt without its trailing spaces, as it was scored: the space
    # belongs to the next word's token.
    return [PromptRequest(prompt=c if p.kind == "qa" else c[:len(c) - trailing_space(c)], context=c,
                          continuations=conts, greedy_tokens=qa_tokens if p.kind == "qa" else greedy_tokens,
                          samples=samples)
            for p, c, conts in zip(probes, contexts, continuations)]


def probe_rows(probes: Sequence[Probe], done: Sequence[Completion]) -> list[dict]:
    """One row per probe from its ``LM.complete`` result (the rows of ``score_probes``)."""
    rows = []
    for probe, out in zip(probes, done, strict=True):
        target, g, samp = out.scores[0], out.greedy, out.samples
        distractor_means = [s.mean_logprob for s in out.scores[1:]]
        hits = [contains_target(x.text, probe.target) for x in samp]
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
            "greedy": g.text,
            "greedy_match": contains_target(g.text, probe.target),
            "greedy_tokens": g.n_tokens,
            "greedy_eos": g.ended_with_eos,
            "samples": [x.text for x in samp],
            "sample_hit_rate": (sum(hits) / len(hits)) if hits else None,
        })
    return rows


def _summary(rows: Sequence[Mapping], kind: str) -> dict:
    ranked = [r for r in rows if r["correct"] is not None]  # probes with distractors
    out = {
        "n": len(rows),
        "accuracy": rate_summary([r["correct"] for r in ranked]),
        "greedy_match": rate_summary([r["greedy_match"] for r in rows]),
        "mean_target_logprob": mean([r["target_logprob"] for r in rows]),
        "mean_target_mean_logprob": mean([r["target_mean_logprob"] for r in rows]),
        "mean_rank": mean([r["rank"] for r in ranked]),
        # the target's mean log-prob per token, averaged over probes, with a bootstrap interval
        "target_logprob": bootstrap_mean_interval([r["target_mean_logprob"] for r in rows]),
    }
    hit_rates = [r["sample_hit_rate"] for r in rows if r.get("sample_hit_rate") is not None]
    if hit_rates:
        # Samples of one probe are not independent: the unit is the probe (its hit share),
        # and the interval is a bootstrap over probes.
        out["sample_hit"] = bootstrap_mean_interval(hit_rates)
        # Pooled over every sample of every probe, with a Wilson interval: narrower, and right
        # when the probes are paraphrases of one question (the layer study's B-questions).
        flags = [i < round(r["sample_hit_rate"] * len(r["samples"]))
                 for r in rows if r.get("sample_hit_rate") is not None and r.get("samples") for i in range(len(r["samples"]))]
        if flags:
            out["sample_hits"] = rate_summary(flags)
    if kind == "qa":
        # Chat format: does the answer end its turn (EOS) within the budget, and how long is it.
        chat = eos_summary([bool(r["greedy_eos"]) for r in rows], [r["greedy_tokens"] for r in rows])
        out["eos"], out["answer_tokens"] = chat["eos"], chat["length"]
    return out


def summarize(rows: Sequence[Mapping]) -> dict[str, dict]:
    """Per kind and for "all": n, accuracy and greedy_match (rate summaries with 95% CI),
    mean target log-prob (sum and per token) and mean rank. Accuracy and mean rank count only
    probes with distractors; they are None/n=0 for kinds that have none."""
    out = {}
    for kind in order_kinds([*(r["kind"] for r in rows), "all"]):
        out[kind] = _summary([r for r in rows if kind == "all" or r["kind"] == kind], kind)
    return out
