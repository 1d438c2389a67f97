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
``relation``, ``object``). Relations the template registry (``factlab.data.templates.RELATIONS``)
knows get its wordings; any other relation gets generic ones ("The {relation} of {subject}
is {object}."). Facts become text through ``factlab.data.render`` (the renderer synthetic
worlds use too) and folders are written by ``factlab.data.writer``.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from factlab.data.checks import find_leakage
from factlab.data.io import iter_jsonl, read_text
from factlab.data.render import (
    N_DISTRACTORS,
    Fact,
    FactIndex,
    Renderer,
    as_facts,
    in_kind_order,
    invertible_relations,
    locality_probes,
    render_documents,
)
from factlab.data.templates import (
    ALIAS,
    RelationTemplates,
    check_lang,
    fill,
    prefix,
    relation_templates,
    relation_wordings,
)
from factlab.data.writer import json_text, jsonl_text, write_data_folder
from factlab.errors import FactlabError

__all__ = ["load_fact_table", "paraphrase_documents", "shuffle_sentences", "reverse_statements", "qa_from_facts",
           "Augmented", "augment_facts", "write_augmented", "load_facts_input", "load_user_paraphrases",
           "checked_facts", "plan_wordings", "WordingPlan"]

FIELDS = ("subject", "relation", "object")


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
    return [f for f, _ in _load_table(Path(path))]


def _aliases(v) -> tuple[str, ...]:
    """An ``aliases`` cell: a JSON list, or one text with names separated by ``;`` or ``|``."""
    if v is None:
        return ()
    items = v if isinstance(v, list) else re.split(r"[;|]", str(v))
    return tuple(a for a in (str(x).strip() for x in items) if a)


def _load_table(path: Path) -> list[tuple[Fact, tuple[str, ...]]]:
    """(fact, subject aliases) per row; see load_fact_table."""
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
    facts: list[tuple[Fact, tuple[str, ...]]] = []
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
        facts.append((Fact(s, r, o, fid, split, str(row.get("subject_type") or ""), str(row.get("object_type") or "")),
                      _aliases(row.get("aliases"))))
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
    for f in as_facts(facts):
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
    fs = as_facts(facts)
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
    fs = as_facts(facts)
    return Renderer({rel: relation_templates(rel, lang) for rel in {f.relation for f in fs}}, lang).qa(fs)


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



def load_facts_input(path: str | Path) -> tuple[list[Fact], dict[str, tuple[str, ...]], str]:
    """(facts, subject aliases by fact id, language) from a fact table (.csv/.tsv/.jsonl) or a
    ``factlab data synth`` world (its folder or its world.json)."""
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
    rows = _load_table(path)
    return [f for f, _ in rows], {f.id: a for f, a in rows if a}, lang


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




def _streams(seed: int) -> Callable[[str], random.Random]:
    """One seeded random stream per purpose: a change in one phase never reshuffles another."""
    return lambda what: random.Random(f"factlab/augment/{seed}/{what}")


# -- phase 1: read and validate the facts --------------------------------------------------------


def checked_facts(facts: Iterable) -> list[Fact]:
    """The input facts as :class:`Fact` (numbered ``f00001``... where they have no id), or a
    FactlabError: no facts, or two facts with one id."""
    facts = as_facts(facts)
    if not facts:
        raise FactlabError("no facts to augment; give a table with subject, relation, object rows")
    ids = [f.id for f in facts]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise FactlabError(f"duplicate fact id {dup!r}; give each fact a unique id")
    return facts


def _check_options(phrasings: int, heldout_phrasings: int, shuffled_docs: int, answers: str, qa_heldout: float,
                   lang: str) -> None:
    check_lang(lang)
    for name, v, lo in (("phrasings", phrasings, 1), ("heldout_phrasings", heldout_phrasings, 1),
                        ("shuffled_docs", shuffled_docs, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise FactlabError(f"{name} must be an integer >= {lo}, got {v!r}")
    if answers not in ("sentence", "short"):
        raise FactlabError(f"answers must be sentence or short, got {answers!r}")
    if not 0.0 <= qa_heldout < 1.0:
        raise FactlabError(f"qa_heldout must be in [0, 1), got {qa_heldout!r}")


# -- phase 2: plan the wordings --------------------------------------------------------------------


@dataclass(frozen=True)
class WordingPlan:
    """Which wording of each relation trains, which is held out for probes, which relations
    are stated (and asked) in reverse."""

    relations: dict[str, RelationTemplates]
    """The renderer's plan, per relation: ``doc`` the training wordings (``phrasings`` of
    them), ``heldout`` the held-out ones, ``answer`` the SFT answer, ``reverse_doc`` /
    ``reverse_probe`` only for the relations in ``reversed``."""
    generic: list[str]
    """Relations on the generic templates."""
    reversed: list[str]
    not_reversed: dict[str, str]
    """Relation -> why it is not reversed."""


def plan_wordings(facts: Sequence[Fact], lang: str, relations: Mapping[str, RelationTemplates], generic: bool,
                  phrasings: int, heldout_phrasings: int, reverse: bool, answers: str,
                  rng: Callable[[str], random.Random]) -> WordingPlan:
    """Split each relation's wordings by the seed into ``heldout_phrasings`` held-out ones and
    ``phrasings`` training ones (too few: an error naming the relation), and decide which
    relations are reversed (one-to-one in ``facts``, with reverse wordings, ``reverse`` on)."""
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
    plan = {rel: replace(spec, doc=tuple(train_t[rel]), heldout=tuple(held_t[rel]),
                         answer=train_t[rel][0] if answers == "sentence" else spec.answer,
                         reverse_doc=spec.reverse_doc if rel in reversed_rel else (),
                         reverse_probe=spec.reverse_probe if rel in reversed_rel else None)
            for rel, spec in specs.items()}
    return WordingPlan(plan, generic_rel, reversed_rel, not_reversed)


def _split_user_paraphrases(paraphrases: Mapping[str, Sequence[str]], heldout_phrasings: int,
                            rng: Callable[[str], random.Random]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(training texts, held-out texts) per fact id: ``heldout_phrasings`` texts of a fact (at
    most all but one) are held out, by the seed."""
    train: dict[str, list[str]] = {}
    held: dict[str, list[str]] = {}
    for fid, texts in sorted(paraphrases.items()):
        texts = list(texts)
        rng(f"paraphrases/{fid}").shuffle(texts)
        k = min(heldout_phrasings, len(texts) - 1)
        held[fid], train[fid] = texts[:k], texts[k:]
    return train, held


def _qa_heldout_subjects(facts: Sequence[Fact], qa: bool, qa_heldout: float,
                         rng: Callable[[str], random.Random]) -> set[str]:
    """Subjects asked as ``qa`` probes and left out of the Q&A: those of ``heldout`` facts, or
    (none marked) a ``qa_heldout`` share drawn by the seed."""
    if any(f.split == "heldout" for f in facts) or not qa:
        return {f.subject for f in facts if f.split == "heldout"}
    order = list(dict.fromkeys(f.subject for f in facts))
    rng("qa-split").shuffle(order)
    return set(order[: round(len(order) * qa_heldout)])


# -- phase 3: render -----------------------------------------------------------------------------


def _documents(r: Renderer, facts: Sequence[Fact], aliases: Mapping[str, Sequence[str]],
               user_train: Mapping[str, list[str]], phrasings: int, shuffled_docs: int,
               rng: Callable[[str], random.Random]) -> list[dict]:
    """Per subject: ``phrasings`` ordered documents (document j: every fact in training
    wording j, reversed relations also object-first, an alias as subject in turn, the aliases
    stated in the first), up to ``shuffled_docs`` documents of mixed wordings in shuffled
    order, and one of the user's own training texts."""
    by_subject: dict[str, list[Fact]] = {}
    for f in facts:
        by_subject.setdefault(f.subject, []).append(f)
    documents: list[dict] = []
    doc_rng = rng("documents")
    for n, (subject, fs) in enumerate(by_subject.items()):
        al = list(dict.fromkeys(a for f in fs for a in aliases.get(f.id, ())))
        extra = [fill(ALIAS[r.lang], s=subject, o=a) for a in al]
        for j in range(phrasings):
            name = al[(j - 1) % len(al)] if al and j > 0 else None
            sentences = r.statements(fs, [0] * len(fs), j, name) + (extra if j == 0 else [])
            documents.append({"id": f"s{n:05d}-p{j}", "text": r.text(sentences)})
        seen = {d["text"] for d in documents[-phrasings:]}
        for k in range(shuffled_docs):
            # a subject with one or two facts has few distinct orders: redraw (a few times) a
            # document that repeats an earlier one, and leave it out if every draw does (a
            # duplicate would only weigh that subject double)
            for _ in range(20):
                text = r.shuffled(r.statements(fs, r.offsets(fs, doc_rng), k), doc_rng)
                if text not in seen:
                    seen.add(text)
                    documents.append({"id": f"s{n:05d}-x{k}", "text": text})
                    break
        own = [t for f in fs for t in user_train.get(f.id, [])]
        if own:
            documents.append({"id": f"s{n:05d}-u", "text": r.shuffled(own, doc_rng)})
    return documents


def _distractors(target: str, pool: Sequence[str], exclude: set[str], rng: random.Random,
                 n: int = N_DISTRACTORS) -> list[str]:
    """Up to ``n`` wrong answers from ``pool`` (same relation, same side), never in ``exclude``."""
    cands = sorted({c for c in pool if c != target and c not in exclude})
    rng.shuffle(cands)
    return cands[:n]


def _probes(r: Renderer, facts: Sequence[Fact], aliases: Mapping[str, Sequence[str]],
            user_held: Mapping[str, list[str]], qa_held: set[str] | None,
            rng: Callable[[str], random.Random]) -> tuple[list[dict], list[dict]]:
    """(probes, selection probes): recall in training wording 0; paraphrase in held-out
    wording 1 and the first held-out user text (wordings 2.. go to the selection probes);
    reverse; qa for the subjects in ``qa_held`` (None: no qa probes). Wrong answers are
    other objects (subjects) of the same relation that are not right answers too."""
    index = FactIndex(facts)
    obj_pool = {rel: [f.object for f in facts if f.relation == rel] for rel in r.plan}
    subj_pool = {rel: [f.subject for f in facts if f.relation == rel] for rel in r.plan}
    all_aliases = {a for v in aliases.values() for a in v}
    prng = rng("probes")

    def paraphrases(f: Fact) -> list[tuple[str, str, bool]]:
        return ([("para" + (str(m) if m > 1 else ""), prefix(t, "o", s=f.subject), m > 1)
                 for m, t in enumerate(r.plan[f.relation].heldout, 1)]
                + [(f"upara{m}", text[: text.find(f.object)].rstrip(), m > 1)
                   for m, text in enumerate(user_held.get(f.id, []), 1)])

    return r.probes(
        facts, {f.id: r.plan[f.relation].doc[0] for f in facts},  # document p0 states every fact in wording 0
        forward=lambda f: _distractors(f.object, obj_pool[f.relation], index.objects_of(f.subject, f.relation), prng),
        backward=lambda f: _distractors(f.subject, subj_pool[f.relation],
                                        index.subjects_of(f.object, f.relation) | all_aliases, prng),
        paraphrases=paraphrases, qa=lambda f: qa_held is not None and f.subject in qa_held)


def _without_leaks(documents: list[dict], qa_rows: list[dict], probes: list[dict],
                   select: list[dict]) -> tuple[list[dict], list[dict], list[str]]:
    """The invariant: no probe's wording is training text. find_leakage is the check `factlab
    data check` runs; here with a shorter minimum so that short prompts are searched too, and a
    leaking probe is dropped (and its id returned), not written."""
    train_texts = [d["text"] for d in documents] + [f"{q['question']}\n{q['answer']}" for q in qa_rows]
    dropped = sorted({leak["probe"] for leak in find_leakage(train_texts, probes + select, min_chars=8)})
    return [p for p in probes if p["id"] not in dropped], [p for p in select if p["id"] not in dropped], dropped


# -- the whole: read -> plan -> render (written by write_augmented) --------------------------------


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
    wordings in shuffled sentence order (fewer when a small subject has no new order left);
    with ``reverse``, every fact of a relation that is one-to-one in the table and has a
    held-out reverse wording is also stated object-first in each of them and asked as a
    ``reverse`` probe (target: the subject). ``paraphrases``: the
    user's own texts per fact id, split by the seed: ``heldout_phrasings`` per fact (at most all
    but one) become paraphrase probes, the rest training documents. Q&A: facts with split
    ``train``; when no fact is marked ``heldout``, a ``qa_heldout`` share of subjects is held
    out by the seed and asked as ``qa`` probes instead. ``answers``: ``sentence`` (the answer
    states the fact in the relation's first training wording, "Nalur lies in the province of
    Drogokir.") or ``short`` (the relation's answer template, by default "{o}."); see the
    README's recipe section for why sentence is the default. Deterministic per seed.

    The phases: :func:`checked_facts` (read / validate), :func:`plan_wordings`, then rendering
    through ``factlab.data.render`` and the leakage filter.
    """
    _check_options(phrasings, heldout_phrasings, shuffled_docs, answers, qa_heldout, lang)
    facts = checked_facts(facts)
    aliases, paraphrases = dict(aliases or {}), dict(paraphrases or {})
    rng = _streams(seed)

    plan = plan_wordings(facts, lang, dict(relations or {}), generic, phrasings, heldout_phrasings, reverse, answers,
                         rng)
    user_train, user_held = _split_user_paraphrases(paraphrases, heldout_phrasings, rng)
    qa_held = _qa_heldout_subjects(facts, qa, qa_heldout, rng)

    r = Renderer(plan.relations, lang)
    documents = _documents(r, facts, aliases, user_train, phrasings, shuffled_docs, rng)
    qa_rows = r.qa(facts, lambda f: f.subject not in qa_held) if qa else []
    probes, select = _probes(r, facts, aliases, user_held, qa_held if qa else None, rng)
    probes, select, dropped = _without_leaks(documents, qa_rows, probes, select)
    probes = in_kind_order(probes + locality_probes(lang))

    subjects = dict.fromkeys(f.subject for f in facts)
    manifest = {
        "seed": seed, "lang": lang,
        "options": {"phrasings": phrasings, "heldout_phrasings": heldout_phrasings, "shuffled_docs": shuffled_docs,
                    "reverse": reverse, "qa": qa, "qa_heldout": qa_heldout, "generic": generic,
                    "answers": answers},
        "counts": {"facts": len(facts), "subjects": len(subjects), "documents": len(documents), "qa": len(qa_rows),
                   "probes": dict(sorted(Counter(p["kind"] for p in probes).items())), "select_probes": len(select),
                   "user_paraphrases": {"train": sum(map(len, user_train.values())), "heldout": sum(map(len, user_held.values()))}},
        "heldout": {
            "templates": {rel: list(plan.relations[rel].heldout) for rel in sorted(plan.relations)},
            "training_templates": {rel: list(plan.relations[rel].doc) for rel in sorted(plan.relations)},
            "qa_subjects": sorted(qa_held),
            "user_paraphrases": {fid: v for fid, v in sorted(user_held.items()) if v},
        },
        "reversed_relations": plan.reversed,
        "not_reversed": dict(sorted(plan.not_reversed.items())),
        "generic_relations": plan.generic,
        "dropped_probes": dropped,
        "notes": [
            "paraphrase probes use held-out wordings (templates or your paraphrases) that no training text contains.",
            "reverse probes (target: the subject) exist for the relations in reversed_relations; the training "
            "documents state those facts object-first too.",
            "qa probes ask about the subjects in heldout.qa_subjects, which qa.jsonl leaves out.",
            "locality probes are well-known real facts the base model should keep.",
        ] + ([f"relations on generic templates (\"The <relation> of <subject> is <object>.\"): {', '.join(plan.generic)}; "
              "give better wordings in a relations file"] if plan.generic else [])
          + ([f"{len(dropped)} probes were dropped because their text is in the training data"] if dropped else []),
    }
    return Augmented(documents, qa_rows, probes, select, manifest)


# -- phase 4: write --------------------------------------------------------------------------------


def write_augmented(aug: Augmented, out: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write ``docs/`` (one .txt per document, or ``docs/corpus.jsonl`` for many), ``qa.jsonl``,
    ``probes.jsonl``, ``select-probes.jsonl`` (when there are selection probes) and
    ``manifest.json`` into ``out``, atomically (``factlab.data.writer``). A non-empty ``out``
    is refused unless ``overwrite``; then factlab's own files are replaced and others kept."""
    out = Path(out)
    names = {"qa": "qa.jsonl", "probes": "probes.jsonl"}
    files = {"qa.jsonl": jsonl_text(aug.qa), "probes.jsonl": jsonl_text(aug.probes)}
    if aug.select_probes:
        names["select_probes"] = "select-probes.jsonl"
        files["select-probes.jsonl"] = jsonl_text(aug.select_probes)
    files["manifest.json"] = json_text({**aug.manifest, "files": {"docs": "docs/", **names}})
    docs = write_data_folder(out, aug.documents, files, overwrite=overwrite)
    return {"docs": docs, **{k: out / v for k, v in names.items()}, "manifest": out / "manifest.json"}
