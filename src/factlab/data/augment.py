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
import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import yaml

from factlab.data.checks import find_leakage
from factlab.data.io import iter_jsonl, read_text
from factlab.data.synth import (
    DOCS_AS_FILES_MAX,
    N_DISTRACTORS,
    RELATIONS,
    Fact,
    RelationTemplates,
    check_lang,
    fill,
    invertible_relations,
    locality_probes,
    prefix,
    relation_templates,
    render_documents,
    sentence_joiner,
)
from factlab.errors import FactlabError

__all__ = ["Fact", "as_fact", "load_fact_table", "paraphrase_documents", "shuffle_sentences",
           "reverse_statements", "qa_from_facts", "invertible_relations", "Augmented", "augment_facts",
           "write_augmented", "load_facts_input", "load_relations_file", "load_user_paraphrases", "unique_facts"]

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
    return [f for f, _ in unique_facts(_load_table(Path(path)), path)[0]]


def _aliases(v) -> tuple[str, ...]:
    """An ``aliases`` cell: a JSON list, or one text with names separated by ``;`` or ``|``."""
    if v is None:
        return ()
    items = v if isinstance(v, list) else re.split(r"[;|]", str(v))
    return tuple(a for a in (str(x).strip() for x in items) if a)


def _load_table(path: Path) -> list[tuple[int, Fact, tuple[str, ...]]]:
    """(line, fact, subject aliases) per row; see load_fact_table."""
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
    facts: list[tuple[int, Fact, tuple[str, ...]]] = []
    first: dict[str, tuple[int, tuple[str, str, str]]] = {}
    for n, (lineno, row) in enumerate(rows, 1):
        s, r, o = (_value(row[k], path, lineno, k) for k in FIELDS)
        fid = str(row.get("id") or "").strip() or f"f{n:05d}"
        if fid in first and first[fid][1] != (s, r, o):  # the same row again is unique_facts' to drop
            raise FactlabError(f"{path}:{lineno}: duplicate id {fid!r} (first on line {first[fid][0]}); give each fact a unique id")
        first.setdefault(fid, (lineno, (s, r, o)))
        split = str(row.get("split") or "train").strip()
        if split not in ("train", "heldout"):
            raise FactlabError(f"{path}:{lineno}: split must be 'train' or 'heldout', got {split!r}")
        facts.append((lineno, Fact(s, r, o, fid, split, str(row.get("subject_type") or ""), str(row.get("object_type") or "")),
                      _aliases(row.get("aliases"))))
    if not facts:
        raise FactlabError(f"fact table {path} has no facts; add rows with subject, relation, object")
    return facts


def unique_facts(rows: Sequence[tuple[int, Fact, tuple[str, ...]]], path: str | Path
                 ) -> tuple[list[tuple[Fact, tuple[str, ...]]], list[tuple[int, int]]]:
    """The table's facts once each: ``((fact, aliases) per kept row, [(dropped line, line it
    repeats)])``. A row stating the same subject, relation and object as an earlier one is
    dropped (its aliases join the first's): trained twice it would only weigh that fact double
    and ask it twice. Two rows giving the same subject and relation different objects (or the
    same fact different splits) are a FactlabError naming both lines: the documents would state
    both ("The province of Nalur is Drogokir. The province of Nalur is Osric.") and the probes
    could only count one of them right. Checked on the rows, before any wording is chosen."""
    kept: list[tuple[Fact, tuple[str, ...]]] = []
    dropped: list[tuple[int, int]] = []
    seen: dict[tuple[str, str], tuple[int, int]] = {}  # (subject, relation) -> (line, index in kept)
    for lineno, f, aliases in rows:
        hit = seen.get((f.subject, f.relation))
        if hit is None:
            seen[(f.subject, f.relation)] = (lineno, len(kept))
            kept.append((f, aliases))
            continue
        first_line, k = hit
        first = kept[k][0]
        if first.object != f.object:
            raise FactlabError(f"{path}: lines {first_line} and {lineno} give {f.subject!r} {f.relation!r} two objects "
                               f"({first.object!r} and {f.object!r}); keep the row that is true and delete the other")
        if first.split != f.split:
            raise FactlabError(f"{path}: lines {first_line} and {lineno} state the same fact with split {first.split!r} "
                               f"and {f.split!r}; keep one row")
        kept[k] = (first, tuple(dict.fromkeys(kept[k][1] + aliases)))
        dropped.append((lineno, first_line))
    return kept, dropped


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


# --------------------------------------------------------------------------------------------
# `factlab data augment`: a whole training + probe set from a fact table
# --------------------------------------------------------------------------------------------
#
# Why these pieces: in the Physics-of-LMs 3.1 biographies, one wording per fact gave 9.7% on
# held-out questions and five wordings with shuffled sentence order 96.6%; a relation trained
# in one direction only is not answered in the other. The probes ask in wordings that were
# never trained (held-out templates, held-out user paraphrases, held-out Q&A facts), and a
# probe whose text turns up in the training text anyway is dropped before anything is written.


@dataclass
class Augmented:
    """What :func:`augment_facts` builds; :func:`write_augmented` saves it."""

    documents: list[dict]
    """``{"id", "text"}``: training documents (CPT)."""
    qa: list[dict]
    """``{"question", "answer", "fact"}``: SFT Q&A for ``train``-split facts."""
    probes: list[dict]
    """recall / paraphrase (held-out wording 1) / reverse / qa / locality probes."""
    select_probes: list[dict]
    """paraphrase probes of held-out wordings 2..M (empty when M = 1): a second probe file to
    choose a recipe on (``factlab tune``'s ``select_probes``) while ``probes`` reports it."""
    manifest: dict


def load_facts_input(path: str | Path, console=None) -> tuple[list[Fact], dict[str, tuple[str, ...]], str]:
    """(facts, subject aliases by fact id, language) from a fact table (.csv/.tsv/.jsonl) or a
    ``factlab data synth`` world (its folder or its world.json). Repeated rows are dropped, with
    one note on `console` (see unique_facts); conflicting rows are a FactlabError."""
    path = Path(path)
    lang = "en"
    if path.is_dir() or path.name == "world.json":
        folder = path if path.is_dir() else path.parent
        summary = folder / "world.json"
        if not summary.is_file() or not (folder / "facts.jsonl").is_file():
            raise FactlabError(f"{path} is not a synth world (needs world.json and facts.jsonl); "
                               "give a fact table (.csv/.jsonl) or a folder written by `factlab data synth`")
        try:
            lang = str(json.loads(read_text(summary, "world summary")).get("lang") or "en")
        except json.JSONDecodeError:
            raise FactlabError(f"{summary} is not valid JSON; write the world again with `factlab data synth`") from None
        path = folder / "facts.jsonl"
    rows, dropped = unique_facts(_load_table(path), path)
    if dropped and console is not None:
        shown = ", ".join(f"line {a} repeats line {b}" for a, b in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
        console.print(f"note: {path}: dropped {len(dropped)} repeated row{'s' if len(dropped) > 1 else ''} ({shown}); "
                      "each fact is used once", markup=False, highlight=False)
    return [f for f, _ in rows], {f.id: a for f, a in rows if a}, lang


def load_relations_file(path: str | Path) -> dict[str, RelationTemplates]:
    """Templates for relations the registry does not know (or to replace its wordings), from a
    YAML or JSON mapping ``relation -> {doc: [...], heldout: [...], question, answer,
    reverse_doc: [...], reverse_probe}``. ``{s}`` is the subject, ``{o}`` the object; in
    ``doc`` / ``heldout`` the subject comes before the object, in ``reverse_probe`` after."""
    path = Path(path)
    try:
        raw = yaml.safe_load(read_text(path, "relations file"))
    except yaml.YAMLError as e:
        raise FactlabError(f"relations file {path} is not valid YAML/JSON ({str(e).splitlines()[0]}); fix the syntax") from None
    if not isinstance(raw, dict) or not raw:
        raise FactlabError(f"relations file {path} must map relation names to templates, e.g. "
                           "mascot: {doc: [\"The mascot of {s} is {o}.\"], heldout: [...], question: \"...\"}")
    allowed = {"doc", "heldout", "question", "answer", "reverse_doc", "reverse_probe"}
    out: dict[str, RelationTemplates] = {}
    for name, spec in raw.items():
        where = f"relations file {path}: relation {name!r}"
        if not isinstance(spec, dict):
            raise FactlabError(f"{where} must be a mapping with doc, heldout and question")
        unknown = set(spec) - allowed
        if unknown:
            raise FactlabError(f"{where}: unknown key {sorted(unknown)[0]!r}; use {', '.join(sorted(allowed))}")
        doc, heldout = spec.get("doc") or [], spec.get("heldout") or []
        if isinstance(doc, str):
            doc = [doc]
        if isinstance(heldout, str):
            heldout = [heldout]
        reverse_doc = spec.get("reverse_doc") or []
        reverse_doc = [reverse_doc] if isinstance(reverse_doc, str) else reverse_doc
        question = spec.get("question") or f"What is the {str(name).replace('_', ' ')} of {{s}}?"
        if not doc:
            raise FactlabError(f"{where} has no doc templates; give at least one, e.g. \"The {name} of {{s}} is {{o}}.\"")
        t = RelationTemplates(str(name), "", "", tuple(map(str, doc)), tuple(map(str, heldout)), str(question),
                              str(spec.get("answer") or "{o}."), tuple(map(str, reverse_doc)),
                              str(spec["reverse_probe"]) if spec.get("reverse_probe") else None)
        for tpl in (*t.doc, *t.heldout):
            if tpl.count("{o}") != 1 or tpl.count("{s}") != 1 or tpl.index("{s}") > tpl.index("{o}"):
                raise FactlabError(f"{where}: template {tpl!r} needs one {{s}} before one {{o}}")
        for tpl in (*t.reverse_doc, *([t.reverse_probe] if t.reverse_probe else [])):
            if tpl.count("{o}") != 1 or tpl.count("{s}") != 1 or tpl.index("{o}") > tpl.index("{s}"):
                raise FactlabError(f"{where}: reverse template {tpl!r} needs one {{o}} before one {{s}}")
        out[str(name)] = t
    return out


def load_user_paraphrases(path: str | Path, facts: Sequence[Fact]) -> dict[str, list[str]]:
    """``{fact id: [texts]}`` from a JSONL of ``{"fact": id, "text": ...}`` lines (several
    texts per fact); every text must contain the fact's object after some text (the part
    before the object is the paraphrase probe's prompt)."""
    path = Path(path)
    by_id = {f.id: f for f in facts}
    out: dict[str, list[str]] = {}
    for lineno, obj in iter_jsonl(path, "paraphrase file"):
        fid, text = obj.get("fact"), obj.get("text")
        if not isinstance(fid, str) or not isinstance(text, str) or not text.strip():
            raise FactlabError(f"{path}:{lineno}: each line needs \"fact\" (a fact id) and a non-empty \"text\"")
        if fid not in by_id:
            raise FactlabError(f"{path}:{lineno}: unknown fact id {fid!r}; use the ids of the fact table (its id column)")
        f, text = by_id[fid], " ".join(text.split())
        i = text.find(f.object)
        if i <= 0:
            raise FactlabError(f"{path}:{lineno}: the text must state the object {f.object!r} after some words "
                               "(the words before it become the held-out question); rewrite it")
        if text not in out.setdefault(fid, []):
            out[fid].append(text)
    if not out:
        raise FactlabError(f"paraphrase file {path} has no lines; add {{\"fact\": id, \"text\": ...}} lines")
    return out


GENERIC_REVERSE_PROBE = {"en": "Asked whose {r} is {o}, the answer is {s}.", "ja": "{r}が{o}であるのは{s}です。"}
"""Held-out reverse wording for relations on generic templates (never a training sentence)."""


def relation_wordings(relation: str, lang: str, user: Mapping[str, RelationTemplates], generic: bool) -> tuple[RelationTemplates, bool]:
    """(templates, is_generic) for a relation: the user's, the registry's, or (only with
    ``generic``) the generic fallbacks with a held-out reverse wording."""
    if relation in user:
        return user[relation], False
    if relation in RELATIONS[lang]:
        return RELATIONS[lang][relation], False
    if not generic:
        raise FactlabError(f"relation {relation!r} has no templates; give them in a relations file (--relations FILE) "
                           f"or pass --generic to use \"The {relation.replace('_', ' ')} of {{subject}} is {{object}}.\"")
    spec = relation_templates(relation, lang)
    words = relation.replace("_", " ").strip()
    return replace(spec, reverse_probe=GENERIC_REVERSE_PROBE[lang].replace("{r}", words)), True


def _distractors(target: str, pool: Sequence[str], exclude: set[str], rng: random.Random, n: int = N_DISTRACTORS) -> list[str]:
    """Up to ``n`` wrong answers from ``pool`` (same relation, same side), never in ``exclude``."""
    cands = sorted({c for c in pool if c != target and c not in exclude})
    rng.shuffle(cands)
    return cands[:n]


def augment_facts(facts: Sequence[Fact], phrasings: int = 3, reverse: bool = True, shuffled_docs: int = 2,
                  qa: bool = True, heldout_phrasings: int = 1, seed: int = 0, lang: str = "en",
                  relations: Mapping[str, RelationTemplates] | None = None, generic: bool = False,
                  aliases: Mapping[str, Sequence[str]] | None = None,
                  paraphrases: Mapping[str, Sequence[str]] | None = None, qa_heldout: float = 0.5,
                  answers: str = "sentence") -> Augmented:
    """Training documents, Q&A and probes from facts (see the section comment above).

    Per relation, the wordings (the relation's doc and held-out templates) are split by the
    seed into ``heldout_phrasings`` held-out ones (probes only) and ``phrasings`` training ones
    (too few: an error naming the relation). Per subject: ``phrasings`` documents, document j
    stating each fact in training wording j, plus up to ``shuffled_docs`` documents with mixed
    wordings in shuffled sentence order (fewer when a small subject has no new order left); with ``reverse``, every fact of a relation that is
    one-to-one in the table and has a held-out reverse wording is also stated object-first in
    each of them and asked as a ``reverse`` probe (target: the subject). ``paraphrases``: the
    user's own texts per fact id, split by the seed: ``heldout_phrasings`` per fact (at most all
    but one) become paraphrase probes, the rest training documents. Q&A: facts with split
    ``train``; when no fact is marked ``heldout``, a ``qa_heldout`` share of subjects is held
    out by the seed and asked as ``qa`` probes instead. ``answers``: ``sentence`` (the answer
    states the fact in the relation's first training wording, "Nalur lies in the province of
    Drogokir.") or ``short`` (the relation's answer template, by default "{o}."); see the
    README's recipe section for why sentence is the default. Deterministic per seed.
    """
    check_lang(lang)
    for name, v, lo in (("phrasings", phrasings, 1), ("heldout_phrasings", heldout_phrasings, 1), ("shuffled_docs", shuffled_docs, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise FactlabError(f"{name} must be an integer >= {lo}, got {v!r}")
    if answers not in ("sentence", "short"):
        raise FactlabError(f"answers must be sentence or short, got {answers!r}")
    if not 0.0 <= qa_heldout < 1.0:
        raise FactlabError(f"qa_heldout must be in [0, 1), got {qa_heldout!r}")
    facts = _facts(facts)
    if not facts:
        raise FactlabError("no facts to augment; give a table with subject, relation, object rows")
    ids = [f.id for f in facts]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise FactlabError(f"duplicate fact id {dup!r}; give each fact a unique id")
    relations, aliases, paraphrases = dict(relations or {}), dict(aliases or {}), dict(paraphrases or {})
    rng = lambda what: random.Random(f"factlab/augment/{seed}/{what}")  # noqa: E731  (one stream per purpose)

    # -- wordings per relation: held-out vs training ------------------------------------------
    specs: dict[str, RelationTemplates] = {}
    generic_rel: list[str] = []
    train_t: dict[str, list[str]] = {}
    held_t: dict[str, list[str]] = {}
    for rel in sorted({f.relation for f in facts}):
        spec, is_generic = relation_wordings(rel, lang, relations, generic)
        specs[rel] = spec
        if is_generic:
            generic_rel.append(rel)
        # The designed held-out wordings go first to the held-out side; the seed orders each group.
        held_first, docs_ = list(spec.heldout), list(spec.doc)
        r = rng(f"templates/{rel}")
        r.shuffle(held_first)
        r.shuffle(docs_)
        pool = held_first + docs_
        if len(pool) < phrasings + heldout_phrasings:
            raise FactlabError(f"relation {rel!r} has {len(pool)} wordings, but --phrasings {phrasings} + "
                               f"--heldout-phrasings {heldout_phrasings} need {phrasings + heldout_phrasings}; lower them "
                               "or give more wordings for it in a relations file (--relations FILE)")
        held_t[rel] = pool[:heldout_phrasings]
        rest = pool[heldout_phrasings:]
        # training wordings: the relation's doc templates first (made for documents), then the rest
        train_t[rel] = ([t for t in rest if t in spec.doc] + [t for t in rest if t not in spec.doc])[:phrasings]

    invertible = invertible_relations(facts)
    reversed_rel = sorted(rel for rel in invertible if reverse and specs[rel].reverse_doc and specs[rel].reverse_probe)
    not_reversed = {rel: ("reverse off" if not reverse else
                          "not one-to-one in the table (the reverse question has several answers)" if rel not in invertible else
                          "no reverse wordings (give reverse_doc and reverse_probe in a relations file)")
                    for rel in specs if rel not in reversed_rel}

    # -- Q&A split -----------------------------------------------------------------------------
    subjects = list(dict.fromkeys(f.subject for f in facts))
    if any(f.split == "heldout" for f in facts) or not qa:
        qa_held = {f.subject for f in facts if f.split == "heldout"}
    else:
        order = list(subjects)
        rng("qa-split").shuffle(order)
        qa_held = set(order[: round(len(order) * qa_heldout)])

    # -- documents -----------------------------------------------------------------------------
    join = sentence_joiner(lang)
    by_subject: dict[str, list[Fact]] = {}
    for f in facts:
        by_subject.setdefault(f.subject, []).append(f)

    def sentence(f: Fact, j: int, subject: str | None = None) -> str:
        return fill(train_t[f.relation][j % phrasings], s=subject or f.subject, o=f.object)

    def rev_sentence(f: Fact, j: int) -> list[str]:
        # the object-first statement in reverse wording j (in turn): several wordings, as for
        # the forward direction, so that the reverse probe's held-out wording is a paraphrase
        # of something trained and not of one fixed sentence
        if f.relation not in reversed_rel:
            return []
        words = specs[f.relation].reverse_doc
        return [fill(words[j % len(words)], s=f.subject, o=f.object)]

    documents: list[dict] = []
    doc_rng = rng("documents")
    user_train: dict[str, list[str]] = {}
    user_held: dict[str, list[str]] = {}
    for fid, texts in sorted(paraphrases.items()):
        texts = list(texts)
        rng(f"paraphrases/{fid}").shuffle(texts)
        k = min(heldout_phrasings, len(texts) - 1)
        user_held[fid], user_train[fid] = texts[:k], texts[k:]
    for n, subject in enumerate(subjects):
        fs = by_subject[subject]
        al = [a for f in fs for a in aliases.get(f.id, ())]
        al = list(dict.fromkeys(al))
        extra = [fill("{s} is also known as {o}." if lang == "en" else "{s}は{o}とも呼ばれる。", s=subject, o=a) for a in al]
        for j in range(phrasings):
            rev = [s for f in fs for s in rev_sentence(f, j)]
            # ordered documents: wording j of every fact, an alias as subject in turn
            name = al[(j - 1) % len(al)] if al and j > 0 else None
            sents = [sentence(f, j, name) for f in fs] + rev + (extra if j == 0 else [])
            documents.append({"id": f"s{n:05d}-p{j}", "text": join.join(sents)})
        seen = {d["text"] for d in documents[-phrasings:]}
        for k in range(shuffled_docs):
            # a subject with one or two facts has few distinct orders: redraw (a few times) a
            # document that repeats an earlier one, and leave it out if every draw does (a
            # duplicate would only weigh that subject double)
            for _ in range(20):
                offsets = [doc_rng.randrange(phrasings) for _ in fs]
                sents = [sentence(f, o + k) for f, o in zip(fs, offsets)] + [s for f, o in zip(fs, offsets) for s in rev_sentence(f, o + k)]
                doc_rng.shuffle(sents)
                if join.join(sents) not in seen:
                    seen.add(join.join(sents))
                    documents.append({"id": f"s{n:05d}-x{k}", "text": join.join(sents)})
                    break
        own = [t for f in fs for t in user_train.get(f.id, [])]
        if own:
            doc_rng.shuffle(own)
            documents.append({"id": f"s{n:05d}-u", "text": join.join(own)})

    qa_rows = []
    if qa:
        for f in facts:
            if f.subject not in qa_held:
                spec = specs[f.relation]
                qa_rows.append({"question": fill(spec.question, s=f.subject, o=f.object),
                                "answer": fill(train_t[f.relation][0] if answers == "sentence" else spec.answer,
                                               s=f.subject, o=f.object), "fact": f.id})

    # -- probes --------------------------------------------------------------------------------
    objects_of: dict[tuple[str, str], set[str]] = {}
    subjects_of: dict[tuple[str, str], set[str]] = {}
    for f in facts:
        objects_of.setdefault((f.subject, f.relation), set()).add(f.object)
        subjects_of.setdefault((f.object, f.relation), set()).add(f.subject)
    obj_pool = {rel: [f.object for f in facts if f.relation == rel] for rel in specs}
    subj_pool = {rel: [f.subject for f in facts if f.relation == rel] for rel in specs}
    all_aliases = {a for v in aliases.values() for a in v}
    prng = rng("probes")

    def probe(pid: str, f: Fact, kind: str, prompt: str, target: str, d: list[str]) -> dict:
        return {"id": pid, "fact": f.id, "kind": kind, "prompt": prompt, "target": target, "distractors": d}

    probes: list[dict] = []
    select: list[dict] = []
    for f in facts:
        d = _distractors(f.object, obj_pool[f.relation], objects_of[(f.subject, f.relation)], prng)
        probes.append(probe(f"{f.id}-recall", f, "recall", prefix(train_t[f.relation][0], "o", s=f.subject), f.object, d))
        for m, t in enumerate(held_t[f.relation], 1):
            (probes if m == 1 else select).append(
                probe(f"{f.id}-para" + (str(m) if m > 1 else ""), f, "paraphrase", prefix(t, "o", s=f.subject), f.object, list(d)))
        for m, text in enumerate(user_held.get(f.id, []), 1):
            (probes if m == 1 else select).append(
                probe(f"{f.id}-upara{m}", f, "paraphrase", text[: text.find(f.object)].rstrip(), f.object, list(d)))
        if f.relation in reversed_rel:
            rd = _distractors(f.subject, subj_pool[f.relation], subjects_of[(f.object, f.relation)] | all_aliases, prng)
            probes.append(probe(f"{f.id}-rev", f, "reverse", prefix(specs[f.relation].reverse_probe, "s", o=f.object), f.subject, rd))
        if qa and f.subject in qa_held:
            probes.append(probe(f"{f.id}-qa", f, "qa", fill(specs[f.relation].question, s=f.subject, o=f.object), f.object, list(d)))
    order = ("recall", "paraphrase", "reverse", "qa")
    probes = sorted(probes, key=lambda p: order.index(p["kind"]))  # stable: fact order within a kind

    # -- the invariant: no probe's wording is training text -------------------------------------
    # find_leakage is the check `factlab data check` runs; here with a shorter minimum so that
    # short prompts are searched too, and a leaking probe is dropped (and counted), not written.
    train_texts = [d["text"] for d in documents] + [f"{q['question']}\n{q['answer']}" for q in qa_rows]
    leaks = find_leakage(train_texts, probes + select, min_chars=8)
    dropped = sorted({leak["probe"] for leak in leaks})
    probes = [p for p in probes if p["id"] not in dropped]
    select = [p for p in select if p["id"] not in dropped]
    probes += locality_probes(lang)

    manifest = {
        "seed": seed, "lang": lang,
        "options": {"phrasings": phrasings, "heldout_phrasings": heldout_phrasings, "shuffled_docs": shuffled_docs,
                    "reverse": reverse, "qa": qa, "qa_heldout": qa_heldout, "generic": generic,
                    "answers": answers},
        "counts": {"facts": len(facts), "subjects": len(subjects), "documents": len(documents), "qa": len(qa_rows),
                   "probes": dict(sorted(Counter(p["kind"] for p in probes).items())), "select_probes": len(select),
                   "user_paraphrases": {"train": sum(map(len, user_train.values())), "heldout": sum(map(len, user_held.values()))}},
        "heldout": {
            "templates": {rel: held_t[rel] for rel in sorted(held_t)},
            "training_templates": {rel: train_t[rel] for rel in sorted(train_t)},
            "qa_subjects": sorted(qa_held),
            "user_paraphrases": {fid: v for fid, v in sorted(user_held.items()) if v},
        },
        "reversed_relations": reversed_rel,
        "not_reversed": dict(sorted(not_reversed.items())),
        "generic_relations": generic_rel,
        "dropped_probes": dropped,
        "notes": [
            "paraphrase probes use held-out wordings (templates or your paraphrases) that no training text contains.",
            "reverse probes (target: the subject) exist for the relations in reversed_relations; the training "
            "documents state those facts object-first too.",
            "qa probes ask about the subjects in heldout.qa_subjects, which qa.jsonl leaves out.",
            "locality probes are well-known real facts the base model should keep.",
        ] + ([f"relations on generic templates (\"The <relation> of <subject> is <object>.\"): {', '.join(generic_rel)}; "
              "give better wordings in a relations file"] if generic_rel else [])
          + ([f"{len(dropped)} probes were dropped because their text is in the training data"] if dropped else []),
    }
    return Augmented(documents, qa_rows, probes, select, manifest)


def _jsonl_text(rows: Iterable[Mapping]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_augmented(aug: Augmented, out: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write ``docs/`` (one .txt per document, or ``docs/corpus.jsonl`` for many), ``qa.jsonl``,
    ``probes.jsonl``, ``select-probes.jsonl`` (when there are selection probes) and
    ``manifest.json`` into ``out``, atomically: everything goes to a temporary sibling folder
    that is renamed to ``out`` once complete. A non-empty ``out`` is refused unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FactlabError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FactlabError(f"output folder {out} is not empty; choose a new folder or pass --force to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        docs = tmp / "docs"
        docs.mkdir()
        if len(aug.documents) <= DOCS_AS_FILES_MAX:
            for d in aug.documents:
                (docs / f"{d['id']}.txt").write_bytes((d["text"] + "\n").encode("utf-8"))
        else:
            (docs / "corpus.jsonl").write_bytes(_jsonl_text(aug.documents).encode("utf-8"))
        names = {"qa": "qa.jsonl", "probes": "probes.jsonl"}
        (tmp / "qa.jsonl").write_bytes(_jsonl_text(aug.qa).encode("utf-8"))
        (tmp / "probes.jsonl").write_bytes(_jsonl_text(aug.probes).encode("utf-8"))
        if aug.select_probes:
            names["select_probes"] = "select-probes.jsonl"
            (tmp / "select-probes.jsonl").write_bytes(_jsonl_text(aug.select_probes).encode("utf-8"))
        manifest = {**aug.manifest, "files": {"docs": "docs/", **names}}
        (tmp / "manifest.json").write_bytes((json.dumps(manifest, ensure_ascii=False, sort_keys=True, indent=2) + "\n").encode("utf-8"))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"docs": out / "docs", **{k: out / v for k, v in names.items()}, "manifest": out / "manifest.json"}
