"""Data augmentation for knowledge injection, on synthetic worlds or on a user's own facts.

Why: in the synthetic-biography studies, training on several paraphrases of each fact, in
shuffled sentence order, lifts held-out Q&A extraction from ~10% to ~97%; training only one
direction of a relation gives ~0% on the reverse question. So the levers are:

- :func:`paraphrase_documents`: ``k`` wordings of every fact, sentences shuffled;
- :func:`shuffle_sentences`: the same for a document you already have;
- :func:`reverse_statements`: the object-first statement of every fact of a relation that
  is one-to-one in your table ("Velmora Works employs Marta Ilvane.");
- :func:`qa_from_facts`: Q&A pairs (``{"question", "answer"}``, the SFT format).

A user's facts come from :func:`load_fact_table` (CSV or JSONL with ``subject``,
``relation``, ``object``). Relations the template registry (``factlab.data.synth.RELATIONS``)
knows get its wordings; any other relation gets generic ones ("The {relation} of {subject}
is {object}.").
"""

from __future__ import annotations

import csv
import io
import random
import re
from pathlib import Path
from typing import Iterable, Mapping

from factlab.data.io import iter_jsonl, read_text
from factlab.data.synth import (
    Fact,
    check_lang,
    fill,
    invertible_relations,
    relation_templates,
    render_documents,
)
from factlab.errors import FactlabError

__all__ = ["Fact", "as_fact", "load_fact_table", "paraphrase_documents", "shuffle_sentences",
           "reverse_statements", "qa_from_facts", "invertible_relations"]

FIELDS = ("subject", "relation", "object")


def as_fact(x: Fact | Mapping | tuple, i: int = 0) -> Fact:
    """A :class:`Fact` from a Fact, a mapping with subject/relation/object (and optional id,
    split) or a (subject, relation, object) tuple; ``i`` numbers facts without an id."""
    if isinstance(x, Fact):
        return x if x.id else Fact(x.subject, x.relation, x.object, f"f{i:05d}", x.split, x.subject_type, x.object_type)
    if isinstance(x, tuple):
        s, r, o = x
        return Fact(str(s), str(r), str(o), f"f{i:05d}")
    return Fact(str(x["subject"]), str(x["relation"]), str(x["object"]), str(x.get("id") or f"f{i:05d}"),
                str(x.get("split") or "train"), str(x.get("subject_type") or ""), str(x.get("object_type") or ""))


def _facts(facts: Iterable) -> list[Fact]:
    return [as_fact(f, i) for i, f in enumerate(facts, 1)]


# --------------------------------------------------------------------------------------------
# Reading a fact table
# --------------------------------------------------------------------------------------------


def _value(v, path: Path, lineno: int, column: str) -> str:
    """A non-empty string cell; numbers (years) are accepted as text."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise FactlabError(f"{path}:{lineno}: {column!r} must be text, got {type(v).__name__}; fix that row")
    s = str(v).strip()
    if not s:
        raise FactlabError(f"{path}:{lineno}: empty {column!r}; every row needs a subject, a relation and an object")
    return s


def load_fact_table(path: str | Path) -> list[Fact]:
    """Facts from a ``.csv`` / ``.tsv`` file (header row with subject, relation, object;
    optional id and split columns; other columns ignored) or a ``.jsonl`` file (one object
    per line with those keys; ``facts.jsonl`` from ``factlab data synth`` works).

    Every malformed row is a FactlabError naming ``file:line``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    rows: list[tuple[int, Mapping]] = []
    if suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path, "fact table"):
            missing = [k for k in FIELDS if k not in obj]
            if missing:
                raise FactlabError(f"{path}:{lineno}: missing {', '.join(map(repr, missing))}; "
                                   "each line needs \"subject\", \"relation\" and \"object\"")
            rows.append((lineno, obj))
    elif suffix in (".csv", ".tsv"):
        text = read_text(path, "fact table").lstrip("\ufeff")  # BOM from spreadsheet exports
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if not set(FIELDS) <= set(header):
            found = ", ".join(reader.fieldnames or []) or "nothing"
            raise FactlabError(f"{path}:1: the header row needs the columns subject, relation, object "
                               f"(found {found}); add that header line")
        reader.fieldnames = header
        for row in reader:
            lineno = reader.line_num
            if None in row:  # more cells than header columns
                raise FactlabError(f"{path}:{lineno}: more cells than header columns; "
                                   "quote values that contain the delimiter")
            if any(row.get(k) is None for k in FIELDS):
                raise FactlabError(f"{path}:{lineno}: too few cells; each row needs subject, relation, object")
            rows.append((lineno, row))
    else:
        raise FactlabError(f"fact table {path}: unsupported file type {path.suffix or '(none)'!r}; "
                           "use .csv, .tsv or .jsonl with subject, relation, object")
    facts: list[Fact] = []
    first: dict[str, int] = {}
    for n, (lineno, row) in enumerate(rows, 1):
        s, r, o = (_value(row[k], path, lineno, k) for k in FIELDS)
        fid = str(row.get("id") or "").strip() or f"f{n:05d}"
        if fid in first:
            raise FactlabError(f"{path}:{lineno}: duplicate id {fid!r} (first on line {first[fid]}); give each fact a unique id")
        first[fid] = lineno
        split = str(row.get("split") or "train").strip()
        if split not in ("train", "heldout"):
            raise FactlabError(f"{path}:{lineno}: split must be 'train' or 'heldout', got {split!r}")
        facts.append(Fact(s, r, o, fid, split, str(row.get("subject_type") or ""), str(row.get("object_type") or "")))
    if not facts:
        raise FactlabError(f"fact table {path} has no facts; add rows with subject, relation, object")
    return facts


# --------------------------------------------------------------------------------------------
# Augmentations
# --------------------------------------------------------------------------------------------


def paraphrase_documents(facts: Iterable, k: int = 3, seed: int = 0, lang: str = "en") -> list[str]:
    """``k`` documents per subject, each stating all of that subject's facts once, worded
    with a different template per document and in shuffled sentence order.

    Relations have 3 registered wordings (2 generic ones in Japanese); beyond that the
    wordings repeat in new sentence orders.
    """
    if not isinstance(k, int) or k < 1:
        raise FactlabError(f"k (paraphrases per fact) must be a positive integer, got {k!r}")
    groups: dict[str, list[Fact]] = {}
    for f in _facts(facts):
        groups.setdefault(f.subject, []).append(f)
    return [d["text"] for d in render_documents(list(groups.items()), k, seed, lang)]


# A sentence ends at . ! ? followed by whitespace, or at a CJK full stop (no space follows).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*")


def split_sentences(doc: str) -> list[str]:
    """Sentences of ``doc`` (newlines separate too). Simple rules: an abbreviation such as
    "Dr. Perl" is split; fine for generated text, check it on your own."""
    return [s for s in (p.strip() for p in _SENTENCE_END.split(doc.strip())) if s]


def shuffle_sentences(doc: str, seed: int = 0) -> str:
    """``doc`` with its sentences in a seeded random order (one paragraph)."""
    sentences = split_sentences(doc)
    random.Random(seed).shuffle(sentences)
    out = ""
    for s in sentences:
        # No space after a CJK full stop, one after Latin punctuation.
        out += s if not out or out[-1] in "。！？" else " " + s
    return out


def reverse_statements(facts: Iterable, lang: str = "en", only_invertible: bool = True) -> list[str]:
    """Object-first statements ("Velmora Works employs Marta Ilvane.").

    By default only for relations that are one-to-one in ``facts``: for a many-to-one
    relation the reverse statement is true but does not identify the subject, so it does
    not make the reverse question answerable. Relations without a registered reverse wording
    use "{object} is the {relation} of {subject}.".
    """
    check_lang(lang)
    fs = _facts(facts)
    keep = invertible_relations(fs) if only_invertible else {f.relation for f in fs}
    out = []
    for f in fs:
        if f.relation in keep:
            spec = relation_templates(f.relation, lang)
            out.append(fill(spec.reverse_doc[0], s=f.subject, o=f.object))
    return out


def qa_from_facts(facts: Iterable, lang: str = "en") -> list[dict]:
    """``{"question", "answer", "fact"}`` per fact, the answer starting with the object (so
    a ``qa`` probe's target is its prefix). Writes as SFT Q&A JSONL."""
    check_lang(lang)
    out = []
    for f in _facts(facts):
        spec = relation_templates(f.relation, lang)
        out.append({"question": fill(spec.question, s=f.subject, o=f.object),
                    "answer": fill(spec.answer, s=f.subject, o=f.object), "fact": f.id})
    return out
