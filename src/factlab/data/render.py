"""The one renderer of facts into training documents, Q&A pairs and probes, for synthetic worlds
(``factlab data synth``) and a user's fact table (``factlab data augment``) alike.

What differs between the two is data, not code: a *plan* maps each relation to the
:class:`~factlab.data.templates.RelationTemplates` to render it with (``doc``: the training
wordings, document ``j`` using wording ``j`` (plus a per-fact offset) modulo their number;
``heldout``: wordings kept for probes; ``reverse_doc``: object-first statements trained beside
the facts, empty for none; ``reverse_probe``: the reverse question, None for none), and the
callers pass their own choice of wrong answers (a world's same-type entities and decoys, a
table's same-relation objects). Probe files list kinds in the one order of
``factlab.evaluate.probes.PROBE_KINDS``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Mapping, Sequence

from factlab.data.templates import RelationTemplates, check_lang, fill, prefix, relation_templates, sentence_joiner
from factlab.data.templates import LOCALITY
from factlab.evaluate.probes import PROBE_KINDS

N_DISTRACTORS = 3


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple, as written to ``facts.jsonl``."""

    subject: str
    relation: str
    object: str
    id: str = ""
    split: str = "train"
    """``train``: used for Q&A; ``heldout``: in the documents only, asked as ``qa`` probes."""
    subject_type: str = ""
    object_type: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


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


def as_facts(facts: Iterable) -> list[Fact]:
    """:func:`as_fact` of each item, numbered from 1."""
    return [as_fact(f, i) for i, f in enumerate(facts, 1)]


class FactIndex:
    """The objects of each (subject, relation) and the subjects of each (object, relation):
    what else is a right answer to a forward or a reverse question."""

    def __init__(self, facts: Iterable[Fact]):
        self.objects: dict[tuple[str, str], set[str]] = {}
        self.subjects: dict[tuple[str, str], set[str]] = {}
        self.fact: dict[tuple[str, str], Fact] = {}
        """(subject, relation) -> a fact (the last one) of that subject and relation."""
        self.relations: list[str] = []
        for f in facts:
            self.objects.setdefault((f.subject, f.relation), set()).add(f.object)
            self.subjects.setdefault((f.object, f.relation), set()).add(f.subject)
            self.fact[(f.subject, f.relation)] = f
            self.relations.append(f.relation)

    def objects_of(self, subject: str, relation: str) -> set[str]:
        return self.objects.get((subject, relation), set())

    def subjects_of(self, obj: str, relation: str) -> set[str]:
        return self.subjects.get((obj, relation), set())

    def invertible(self) -> set[str]:
        """Relations that are one-to-one (no object has two subjects, no subject two objects):
        only their reverse question has a single right answer."""
        broken = {rel for (_, rel), v in self.objects.items() if len(v) > 1}
        broken |= {rel for (_, rel), v in self.subjects.items() if len(v) > 1}
        return set(self.relations) - broken


def invertible_relations(facts: Iterable[Fact]) -> set[str]:
    """Relations that are one-to-one in these facts (see :meth:`FactIndex.invertible`)."""
    return FactIndex(facts).invertible()


def world_plan(facts: Sequence[Fact], lang: str) -> dict[str, RelationTemplates]:
    """The plan of a synthetic world: the registered (or generic) wordings of each relation,
    no object-first statements in the documents, and a reverse question only for relations that
    are one-to-one in ``facts``."""
    invertible = invertible_relations(facts)
    plan = {}
    for rel in dict.fromkeys(f.relation for f in facts):
        spec = relation_templates(rel, lang)
        plan[rel] = replace(spec, reverse_doc=(), reverse_probe=spec.reverse_probe if rel in invertible else None)
    return plan


def probe(pid: str, fact: str, kind: str, prompt: str, target: str, distractors: list[str]) -> dict:
    """One probe row of a probe file (see ``factlab.evaluate.probes``)."""
    return {"id": pid, "fact": fact, "kind": kind, "prompt": prompt, "target": target, "distractors": distractors}


def in_kind_order(probes: Iterable[dict]) -> list[dict]:
    """Probes grouped by kind in the one kind order (``PROBE_KINDS``); stable, so the order
    within a kind (fact order) is kept."""
    return sorted(probes, key=lambda p: PROBE_KINDS.index(p["kind"]))


def locality_probes(lang: str = "en") -> list[dict]:
    """The built-in well-known facts as ``locality`` probes (about 30 English, 10 Japanese)."""
    check_lang(lang)
    return [probe(f"loc-{lang}-{i:02d}", f"loc-{lang}-{i:02d}", "locality", p, t, list(d))
            for i, (p, t, d) in enumerate(LOCALITY[lang], 1)]


Paraphrase = tuple[str, str, bool]
"""(id suffix, prompt, spare) of one paraphrase probe; spare ones go to a second probe set."""


class Renderer:
    """Facts -> sentences, documents, Q&A and probes in the wordings of ``plan``."""

    def __init__(self, plan: Mapping[str, RelationTemplates], lang: str):
        check_lang(lang)
        self.plan, self.lang = plan, lang

    # -- documents -------------------------------------------------------------------------
    def statements(self, facts: Sequence[Fact], offsets: Sequence[int], j: int,
                   subject: str | None = None) -> list[str]:
        """Every fact in its training wording ``offset + j``, then (for relations whose plan
        has ``reverse_doc``) every fact object-first in reverse wording ``offset + j``;
        ``subject`` replaces the subject of the forward sentences (an alias)."""
        forward = [fill(self._pick(self.plan[f.relation].doc, o + j), s=subject or f.subject, o=f.object)
                   for f, o in zip(facts, offsets, strict=True)]
        backward = [fill(self._pick(self.plan[f.relation].reverse_doc, o + j), s=f.subject, o=f.object)
                    for f, o in zip(facts, offsets, strict=True) if self.plan[f.relation].reverse_doc]
        return forward + backward

    @staticmethod
    def _pick(wordings: Sequence[str], j: int) -> str:
        return wordings[j % len(wordings)]

    def offsets(self, facts: Sequence[Fact], rng: random.Random) -> list[int]:
        """A random starting wording per fact, so that one document mixes wordings."""
        return [rng.randrange(len(self.plan[f.relation].doc)) for f in facts]

    def text(self, sentences: Iterable[str]) -> str:
        return sentence_joiner(self.lang).join(sentences)

    def shuffled(self, sentences: list[str], rng: random.Random) -> str:
        """The sentences in a random order, joined (the order of the text gives nothing away)."""
        rng.shuffle(sentences)
        return self.text(sentences)

    def documents(self, groups: Sequence[tuple[str, Sequence[Fact]]], k: int,
                  rng: random.Random) -> tuple[list[dict], dict[str, str]]:
        """``k`` documents ``{"id", "entity", "text"}`` per group (an entity and its facts).
        Document ``j`` words each fact with wording ``offset + j`` (offset drawn per fact) and
        shuffles the sentence order, as in the multi-paraphrase biography setups. Also returns
        each fact's recall wording: the one of document 0."""
        docs, recall = [], {}
        for gid, facts in groups:
            offsets = self.offsets(facts, rng)
            for f, o in zip(facts, offsets, strict=True):
                recall[f.id] = self._pick(self.plan[f.relation].doc, o)
            for j in range(k):
                text = self.shuffled(self.statements(facts, offsets, j), rng)
                docs.append({"id": f"{gid}-{j}", "entity": gid, "text": text})
        return docs, recall

    # -- Q&A ---------------------------------------------------------------------------------
    def qa(self, facts: Iterable[Fact], asked: Callable[[Fact], bool] = lambda f: True) -> list[dict]:
        """``{"question", "answer", "fact"}`` for the facts ``asked`` keeps (the SFT format)."""
        out = []
        for f in facts:
            if asked(f):
                spec = self.plan[f.relation]
                out.append({"question": fill(spec.question, s=f.subject, o=f.object),
                            "answer": fill(spec.answer, s=f.subject, o=f.object), "fact": f.id})
        return out

    # -- probes ------------------------------------------------------------------------------
    def probes(self, facts: Iterable[Fact], recall: Mapping[str, str], forward: Callable[[Fact], list[str]],
               backward: Callable[[Fact], list[str]], paraphrases: Callable[[Fact], list[Paraphrase]],
               qa: Callable[[Fact], bool]) -> tuple[list[dict], list[dict]]:
        """(probes, spare paraphrase probes) per fact, in fact order: ``recall`` in the wording
        ``recall[fact id]``, ``paraphrase`` for each of ``paraphrases(f)``, ``reverse`` when the
        plan has a reverse question, ``qa`` when ``qa(f)``. ``forward(f)`` / ``backward(f)``:
        the wrong answers to the forward / reverse question (called in that order, once per
        fact, the latter only for reverse probes, so a seeded choice is repeatable)."""
        main: list[dict] = []
        spare: list[dict] = []
        for f in facts:
            spec = self.plan[f.relation]
            d = forward(f)
            main.append(probe(f"{f.id}-recall", f.id, "recall", prefix(recall[f.id], "o", s=f.subject), f.object, d))
            for suffix, prompt, is_spare in paraphrases(f):
                p = probe(f"{f.id}-{suffix}", f.id, "paraphrase", prompt, f.object, list(d))
                (spare if is_spare else main).append(p)
            if spec.reverse_probe:
                main.append(probe(f"{f.id}-rev", f.id, "reverse", prefix(spec.reverse_probe, "s", o=f.object),
                                  f.subject, backward(f)))
            if qa(f):
                question = fill(spec.question, s=f.subject, o=f.object)
                main.append(probe(f"{f.id}-qa", f.id, "qa", question, f.object, list(d)))
        return main, spare


def render_documents(groups: list[tuple[str, list[Fact]]], paraphrases: int = 1, seed: int = 0,
                     lang: str = "en") -> list[dict]:
    """Documents ``{"id", "entity", "text"}`` for groups of facts (usually one subject's),
    ``paraphrases`` per group, worded and shuffled as in ``synth_world``. Facts need unique ids."""
    check_lang(lang)
    r = Renderer(world_plan([f for _, fs in groups for f in fs], lang), lang)
    return r.documents(groups, paraphrases, random.Random(f"factlab/documents/{seed}/docs/{lang}"))[0]
