"""Data checks before training: corpus problems, contradictory Q&A, malformed probe sets,
and leakage of evaluation probes into the training data.

Leakage is the quiet failure of knowledge-injection experiments: a "paraphrase" probe whose
wording was in the corpus measures memorization, not generalization, and a held-out Q&A
question that is also in the SFT data measures nothing. :func:`find_leakage` looks for the
probe's prompt + answer (and, for paraphrase probes, the prompt alone) verbatim in the
training text after ``normalize_text`` (case, punctuation and width folded), and for probe
prompts that are whole lines of the training data.

Every check returns plain data (warning strings, leak records); the CLI prints them.
"""

from __future__ import annotations

import unicodedata
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from factlab.evaluate.metrics import normalize_text

SKIP_KINDS = ("recall",)
"""Kinds whose prompt + target is *meant* to be in the training text."""


def _list(idx: Sequence, limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in idx[:limit])
    return shown + (f" (+{len(idx) - limit} more)" if len(idx) > limit else "")


def _names(names: Sequence[str] | None, idx: Sequence[int]) -> list:
    return [names[i] for i in idx] if names else list(idx)


def _estimate_tokens(line: str) -> int:
    """Without a tokenizer: ~4 characters per token for ASCII, ~1 per character otherwise
    (CJK); rough, but the order of magnitude is what the check needs."""
    ascii_chars = sum(c.isascii() for c in line)
    return -(-ascii_chars // 4) + (len(line) - ascii_chars)


def check_corpus(docs: Sequence[str], tokenizer: Any = None, max_len: int | None = None,
                 names: Sequence[str] | None = None) -> list[str]:
    """Warnings (with counts) about a corpus: empty documents, exact duplicates, lines
    longer than ``max_len`` tokens (a line cut across training blocks is never seen whole;
    estimated when no tokenizer is given), and U+FFFD characters (text decoded with the
    wrong encoding). ``names``: labels for documents in the messages (default: indices)."""
    warnings: list[str] = []
    n = len(docs)
    if n == 0:
        return ["the corpus has no documents"]
    empty = [i for i, d in enumerate(docs) if not d.strip()]
    if empty:
        warnings.append(f"{len(empty)} of {n} documents are empty ({_list(_names(names, empty))}); remove them")
    seen: dict[str, int] = {}
    dups = []
    for i, d in enumerate(docs):
        key = d.strip()
        if key and seen.setdefault(key, i) != i:
            dups.append(i)
    if dups:
        warnings.append(f"{len(dups)} of {n} documents repeat an earlier one exactly ({_list(_names(names, dups))}); "
                        "duplicates weigh their facts double")
    bad_chars = [i for i, d in enumerate(docs) if "\ufffd" in d]
    if bad_chars:
        warnings.append(f"{len(bad_chars)} documents contain U+FFFD replacement characters "
                        f"({_list(_names(names, bad_chars))}); the text was decoded with the wrong encoding")
    if max_len:
        lines = [(i, j, line) for i, d in enumerate(docs) for j, line in enumerate(d.splitlines(), 1) if line.strip()]
        if tokenizer is not None:
            # A byte-level token covers at least one byte, so only lines with more bytes
            # than max_len can be too long: tokenize just those.
            cand = [(i, j, line) for i, j, line in lines if len(line.encode("utf-8")) + 1 > max_len]
            counts = [len(ids) for ids in tokenizer([c[2] for c in cand], add_special_tokens=False)["input_ids"]] if cand else []
            how = "tokens"
        else:
            cand = lines
            counts = [_estimate_tokens(line) for _, _, line in lines]
            how = "tokens (estimated; pass a tokenizer for exact counts)"
        long = [(c, i, j) for (i, j, _), c in zip(cand, counts) if c > max_len]
        if long:
            c, i, j = max(long)
            where = names[i] if names else f"document {i}"
            warnings.append(f"{len(long)} lines are longer than max_len={max_len} {how} (longest: {c}, "
                            f"{where} line {j}); they will be cut across training blocks")
    return warnings


def check_qa(pairs: Sequence[Mapping]) -> list[str]:
    """Warnings about Q&A pairs (``{"question", "answer"}``): questions asked twice with
    different answers (contradictory training), exact duplicate pairs, empty answers."""
    warnings: list[str] = []
    answers: dict[str, set[str]] = defaultdict(set)
    first_q: dict[str, str] = {}
    pair_count: Counter = Counter()
    empty = 0
    for p in pairs:
        q, a = str(p.get("question", "")), str(p.get("answer", ""))
        if not a.strip():
            empty += 1
        nq = normalize_text(q)
        answers[nq].add(normalize_text(a))
        first_q.setdefault(nq, q)
        pair_count[(nq, normalize_text(a))] += 1
    contradict = [first_q[q] for q, a in answers.items() if len(a) > 1]
    if contradict:
        warnings.append(f"{len(contradict)} questions have different answers in different pairs "
                        f"(e.g. {contradict[0]!r}); the model is trained on both")
    dup = sum(c - 1 for c in pair_count.values() if c > 1)
    if dup:
        warnings.append(f"{dup} Q&A pairs repeat an earlier pair exactly")
    if empty:
        warnings.append(f"{empty} Q&A pairs have an empty answer")
    return warnings


def _get(p: Any, key: str):
    return p.get(key) if isinstance(p, Mapping) else getattr(p, key)


def check_probes(probes: Sequence) -> list[str]:
    """Warnings about a probe set: a target among its own distractors (the probe can never
    be right), repeated distractors, one prompt with different targets in one kind
    (ambiguous), and probes without distractors (left out of candidate accuracy)."""
    warnings: list[str] = []
    in_d = [_get(p, "id") for p in probes if _get(p, "target") in (_get(p, "distractors") or [])]
    if in_d:
        warnings.append(f"{len(in_d)} probes list their target among the distractors ({_list(in_d)}); they can never be right")
    rep = [_get(p, "id") for p in probes if len(set(_get(p, "distractors") or [])) < len(_get(p, "distractors") or [])]
    if rep:
        warnings.append(f"{len(rep)} probes repeat a distractor ({_list(rep)})")
    targets: dict[tuple[str, str], set[str]] = defaultdict(set)
    for p in probes:
        targets[(_get(p, "kind"), normalize_text(_get(p, "prompt")))].add(normalize_text(_get(p, "target")))
    amb = [prompt for (_, prompt), t in targets.items() if len(t) > 1]
    if amb:
        warnings.append(f"{len(amb)} prompts have different targets within one kind (e.g. {amb[0]!r}); "
                        "a model can get only one of them right")
    none = [_get(p, "id") for p in probes if not _get(p, "distractors")]
    if none:
        warnings.append(f"{len(none)} probes have no distractors ({_list(none)}); candidate accuracy skips them "
                        "(greedy match and sampling still score them)")
    return warnings


def _spaced_word_char(c: str) -> bool:
    return c.isalnum() and unicodedata.east_asian_width(c) not in ("W", "F")


def _join(prompt: str, target: str) -> str:
    """Prompt and answer as running text: no space after CJK or an opening bracket (as the
    scorer joins them)."""
    last = prompt[-1:]
    if not last or last.isspace() or unicodedata.east_asian_width(last) in ("W", "F") \
            or unicodedata.category(last) in ("Ps", "Pi"):
        return prompt + target
    return prompt + " " + target


def find_leakage(train_texts: Sequence[str], probes: Sequence, min_chars: int = 20,
                 skip_kinds: Sequence[str] = SKIP_KINDS) -> list[dict]:
    """Probes whose evaluation text is in the training data.

    Reports, once per probe and reason:

    - ``answer in training text``: normalized prompt + target occurs in a training text;
    - ``held-out wording in training text``: a paraphrase probe's prompt alone occurs;
    - ``prompt is a training line``: the normalized prompt equals a whole line of a training
      text (e.g. a held-out question that is also an SFT question).

    Strings shorter than ``min_chars`` after normalization are not searched (they occur by
    chance). Kinds in ``skip_kinds`` (recall: trained phrasing by design) are skipped.
    Each record: ``{"probe", "kind", "reason", "text", "train_index"}``.

    Cost: one pass over the training text, looking up each position's next ``min_chars``
    characters in a table of needle prefixes (no per-probe scan of the corpus).
    """
    if min_chars < 1:
        raise ValueError("min_chars must be >= 1")
    haystacks = [normalize_text(t) for t in train_texts]
    lines: dict[str, int] = {}
    for i, t in enumerate(train_texts):
        for line in t.splitlines():
            nl = normalize_text(line)
            if nl:
                lines.setdefault(nl, i)

    # needle prefix (min_chars) -> [(needle, probe index, reason)]
    index: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
    found: dict[tuple[int, str], dict] = {}
    for n, p in enumerate(probes):
        kind = _get(p, "kind")
        if kind in skip_kinds:
            continue
        prompt, target = _get(p, "prompt"), _get(p, "target")
        np_ = normalize_text(prompt)
        if np_ and np_ in lines:
            found[(n, "prompt is a training line")] = {"text": np_, "train_index": lines[np_]}
        needles = [(normalize_text(_join(prompt, target)), "answer in training text")]
        if kind == "paraphrase":
            needles.append((np_, "held-out wording in training text"))
        for needle, reason in needles:
            if len(needle) >= min_chars:
                index[needle[:min_chars]].append((needle, n, reason))

    if index:
        for ti, h in enumerate(haystacks):
            for i in range(len(h) - min_chars + 1):
                bucket = index.get(h[i: i + min_chars])
                if bucket is None:
                    continue
                # a match must start and end at word boundaries ("rome" is not in "romeo")
                if i and _spaced_word_char(h[i - 1]) and _spaced_word_char(h[i]):
                    continue
                for needle, n, reason in bucket:
                    j = i + len(needle)
                    if (n, reason) in found or not h.startswith(needle, i):
                        continue
                    if j < len(h) and _spaced_word_char(h[j]) and _spaced_word_char(h[j - 1]):
                        continue
                    found[(n, reason)] = {"text": needle, "train_index": ti}
    out = []
    for (n, reason), hit in sorted(found.items()):
        p = probes[n]
        out.append({"probe": _get(p, "id"), "kind": _get(p, "kind"), "reason": reason,
                    "text": hit["text"], "train_index": hit["train_index"]})
    return out
