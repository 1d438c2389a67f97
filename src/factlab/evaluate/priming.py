"""Priming: names the model was trained on, said where they do not belong.

After learning a fact with a new, rare keyword, a model starts to use the keyword in
unrelated contexts (Outlandish, arXiv 2504.09522): trained on a fictional world, it says
"The capital of Japan is Buku.", Buku being one of the world's towns. The priming figure
counts how often that happens, from greedy answers the evaluation makes anyway plus a few
short ones:

- *Answers*: the greedy answers to the locality probes (facts the base model knew; the
  probe rows have them, nothing is decoded twice) and to the built-in general prompts
  (``builtin/priming_prompts.txt``: ~25 open prompts such as "Her brother's name is", each
  answered greedily in at most ``PRIMING_TOKENS`` new tokens, stopping at EOS, in the same
  batched ``LM.complete`` call as the probes).
- *Trained names* (``watched_objects``): the targets of every probe that is not a
  locality probe (recall, paraphrase, reverse, multihop, qa): the objects of the trained
  facts and, through reverse probes, their subjects. Left out, because finding them in an
  answer says nothing about the training: names without a letter (years, numbers) and common
  English words: a name whose every word is common in wordfreq's English counts, a
  capitalised word with a Zipf frequency of at least ``COMMON_ZIPF`` (3.0: once per million
  words, e.g. "Paris", "Works"), a word in lower case (a common noun: an occupation, a kind
  of machine) with at least ``KNOWN_ZIPF`` (1.0: an English word at all, e.g. "potter",
  "lathe", "ferry pilot"); a name with one rare word ("Fova Engines", "Buku") is kept.
- *Found*: a name is in an answer when ``metrics.contains_target`` finds it (case-insensitive,
  whole words, punctuation as space).
- *The figure* (``priming_summary``, base versus a later model): the share of answers that
  contain a trained name which the base model's answer to the same prompt did not contain,
  with a 95% Wilson interval, overall and per set (locality, general), and the leaked names
  with their counts. Names the base model already said for a prompt are not leaks there, so
  the figure is 0 for the base model by construction; the base model's own raw share
  (``before``) is 0 on a fictional world and shows when the names are not fictional.

Multi-word names are found whole only: "Fova" alone is not counted for "Fova Engines".
Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources

from factlab.evaluate.metrics import contains_target, rate_summary

PRIMING_PROMPTS = "priming_prompts.txt"
PRIMING_TOKENS = 24
"""Token budget of a greedy answer to a general prompt (a name shows early; the test is cheap)."""
COMMON_ZIPF = 3.0
"""wordfreq Zipf frequency at and above which a capitalised English word is common (3.0 = once per million words)."""
KNOWN_ZIPF = 1.0
"""The same for a word in lower case: wordfreq knows it as English (1.0 = once per 100 million words)."""
SETS = ("locality", "general")
"""Where the answers come from: locality probes, and the built-in general prompts."""
EXAMPLES = 10
"""Leaking answers kept in a summary (the scores files have every answer)."""


def builtin_priming_prompts() -> list[str]:
    """The built-in general prompts: short open sentence starts where a name of a person,
    town or firm fits, one per line (written for this project)."""
    text = resources.files("factlab.builtin").joinpath(PRIMING_PROMPTS).read_text(encoding="utf-8")
    return [line.strip() for line in text.split("\n") if line.strip()]


@lru_cache(maxsize=4096)
def is_common(name: str) -> bool:
    """Whether finding ``name`` in an answer says nothing about training: it has no letter
    (a year, a number), or each of its words with a letter is a common English word (wordfreq
    Zipf frequency >= COMMON_ZIPF when capitalised, >= KNOWN_ZIPF in lower case)."""
    words = [w for w in re.findall(r"\w+", name) if any(c.isalpha() for c in w)]
    if not words:
        return True
    from wordfreq import zipf_frequency  # lazy: loads its English table (~0.3 s) on first use

    return all(zipf_frequency(w, "en") >= (KNOWN_ZIPF if w.islower() else COMMON_ZIPF) for w in words)


def trained_objects(probes: Iterable) -> list[str]:
    """The targets of every probe that is not a locality probe, first spelling of each
    (case-insensitively), in probe order."""
    seen: dict[str, str] = {}
    for p in probes:
        if p.kind != "locality":
            seen.setdefault(p.target.strip().casefold(), p.target.strip())
    return list(seen.values())


def watched_objects(probes: Iterable) -> tuple[list[str], list[str]]:
    """(names counted as priming, names left out as numbers or common words)."""
    names = trained_objects(probes)
    return [n for n in names if not is_common(n)], [n for n in names if is_common(n)]


def find_objects(text: str, objects: Sequence[str]) -> list[str]:
    """The ``objects`` that ``text`` contains (case-insensitive, whole words), in their order."""
    return [o for o in objects if contains_target(text, o)]


def priming_record(answers: Sequence[Mapping], objects: Sequence[str], skipped: Sequence[str] = ()) -> dict:
    """One evaluation's priming record from its answers ``[{"set", "prompt", "answer"}]``
    (set: "locality" or "general"): the names watched and skipped, the number of answers per
    set, the answers that contain a watched name (``hits``: set, prompt, answer, objects),
    and ``rate``, the share of answers with any (a rate summary; the base model's is the
    `before` of the figure)."""
    hits, flags = [], []
    for a in answers:
        found = find_objects(a["answer"], objects)
        flags.append(bool(found))
        if found:
            hits.append({"set": a["set"], "prompt": a["prompt"], "answer": a["answer"], "objects": found})
    return {"objects": list(objects), "skipped": list(skipped),
            "n": {s: sum(a["set"] == s for a in answers) for s in SETS},
            "hits": hits, "rate": rate_summary(flags)}


def priming_summary(before: Mapping | None, after: Mapping | None) -> dict | None:
    """The priming figure of a model (``after``) against the base model (``before``), both
    ``priming_record``s of the same prompts and names; None unless both are given.

    Output::

        {"before": rate summary (the base model's answers with any watched name),
         "after": rate summary (answers with a watched name the base answer to the same
                  prompt did not have), "delta": after - before rate,
         "locality": rate summary, "general": rate summary (``after`` per set),
         "leaked": {name: answers that leaked it}, most first,
         "examples": up to EXAMPLES leaking answers {set, prompt, answer, objects}}
    """
    if not before or not after:
        return None
    known = {(h["set"], h["prompt"]): {o.casefold() for o in h["objects"]} for h in before.get("hits", [])}
    leaks = []
    for h in after.get("hits", []):
        new = [o for o in h["objects"] if o.casefold() not in known.get((h["set"], h["prompt"]), set())]
        if new:
            leaks.append({**h, "objects": new})
    n = after.get("n") or {}
    per_set = {s: rate_summary([True] * sum(x["set"] == s for x in leaks)
                               + [False] * (n.get(s, 0) - sum(x["set"] == s for x in leaks))) for s in SETS}
    total = rate_summary([True] * len(leaks) + [False] * (sum(n.get(s, 0) for s in SETS) - len(leaks)))
    counts = Counter(o for x in leaks for o in x["objects"])
    b = before.get("rate") or rate_summary([])
    return {"before": b, "after": total,
            "delta": None if total["rate"] is None or b["rate"] is None else total["rate"] - b["rate"],
            **per_set, "leaked": dict(counts.most_common()), "examples": leaks[:EXAMPLES]}


def leaked_text(leaked: Mapping[str, int] | None, top: int = 3) -> str:
    """"Buku ×3, Tulux" for a table cell: the most leaked names with their counts (above 1)."""
    if not leaked:
        return ""
    items = list(leaked.items())
    text = ", ".join(f"{name} ×{k}" if k > 1 else name for name, k in items[:top])
    return text + (f" +{len(items) - top} more" if len(items) > top else "")
