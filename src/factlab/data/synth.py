"""Synthetic fact worlds: fictional entities no pretrained model can know, rendered into
training documents, SFT Q&A pairs and probes of every kind.

Why synthetic: knowledge-injection studies (e.g. the synthetic-biography experiments) only
mean something when the base model cannot already know the facts, and when the training
wording, the held-out wording and the reverse / two-hop questions are under our control.

A world is built in three steps, each from its own seeded random stream (so that an English
and a Japanese world from the same seed share one fact graph, and changing a template never
reshuffles the graph):

1. **graph** (language-independent): organizations, the person who works at each, the
   machine each makes, the towns they sit in and the provinces of those towns, plus
   attributes (occupation, founding year, birth year, machine type). ``works_at`` and
   ``made_by`` are one-to-one by construction, so their reverse questions have one answer.
2. **names**: invented names composed from syllables (katakana morae for Japanese), checked
   against a small list of real names and words, every name stem used once.
3. **rendering**: documents (one entity per document, full name in every sentence so each
   sentence is a self-contained statement of one fact; ``paraphrases`` documents per entity
   with different wordings and shuffled sentence order), Q&A for the ``train`` split only,
   and probes:

   ========== ================================================================
   recall     the trained wording up to the answer ("Marta Ilvane works at")
   paraphrase a held-out wording never used in any document
   reverse    object -> subject, for one-to-one relations
   multihop   two relations composed ("The town where X's employer is located is")
   locality   well-known real facts (the base model should keep them)
   qa         the chat question, only for ``heldout`` facts (never in the Q&A)
   ========== ================================================================

Distractors are same-type entities of the world; small worlds that lack enough of them are
topped up with *decoys*: invented names of that type that never appear in training (listed
in ``world.json``).

Also here: :func:`synth_chain` (causal chain A -> B -> ... ) and :func:`synth_containment`
(nested sets "A is in B"), the seed studies' structures, written by the same
:func:`write_world`.

The wordings are ``factlab.data.templates``; rendering facts into documents, Q&A and probes is
``factlab.data.render`` (shared with ``factlab data augment``); writing is ``factlab.data.writer``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

from factlab.data.render import (
    N_DISTRACTORS,
    Fact,
    FactIndex,
    Renderer,
    in_kind_order,
    locality_probes,
    probe,
    world_plan,
)
from factlab.data.templates import (
    CHAIN_ASK,
    CHAIN_INDIRECT,
    MACHINE_TYPES,
    MULTIHOP,
    RELATIONS,
    ROLES,
    YES_NO,
    check_lang,
    fill,
    prefix,
)
from factlab.data.writer import json_text, jsonl_text, write_data_folder
from factlab.errors import FactlabError

MAX_FACTS = 100_000


# --------------------------------------------------------------------------------------------
# Invented names
# --------------------------------------------------------------------------------------------

# Real names and words the syllable generator could produce; a collision would let the base
# model "know" a fact. Short, not exhaustive: distinctive onsets (v, z, qu, th, kr) keep
# accidental real names rare.
_REAL = set("""
anna maria sara sarah tina nina lena dana mara mira nora vera lara kara tara rosa rita
lisa lina mina gina dina ella emma eva ada ida una ava mia zoe luna paris rome roma lima
oslo bern riga sofia milan kyoto osaka tokyo berlin london madrid moscow cairo vienna athens
delhi texas dallas boston kansas nevada malta cuba peru chile china india japan korea
kenya ghana mali niger sudan libya syria iran iraq oman qatar yemen nepal laos burma
samoa tonga fiji haiti aruba cyprus greece spain france italy egypt tom bob ben sam dan
tim jim max leo theo noah liam adam eric ivan igor boris oscar victor hugo bruno marco
mario luca nico tony dino romeo juliet maren karen helen ellen susan megan dora thor odin
zeus hera loki ra venus mars pluto saturn jupiter mercury neptune uranus terra gaia
sole luna nova vega rigel sirius tesla ford volvo fiat seat skoda audi honda mazda sony
nokia lego ikea zara gucci prada nike puma rolex omega canon nikon ricoh sega atari
kona koda kodak bora vino toro taro tofu sake soba kobe sumo judo kendo zen tao
""".split())
_REAL_JA = {"サクラ", "カラス", "ミカン", "カメラ", "パリ", "ローマ", "ロミオ", "トマト", "バナナ",
            "アメリカ", "カナダ", "タナカ", "スズキ", "サトウ", "ホンダ", "マツダ", "ソニー", "トヨタ"}

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "qu",
           "r", "s", "st", "t", "th", "tr", "v", "z"]
_INNER_ONSETS = ["b", "d", "g", "k", "l", "m", "n", "r", "s", "t", "v", "z"]  # no clusters mid-word
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ae"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "nd"]
_MORAE = ("ア イ ウ エ オ カ キ ク ケ コ サ シ ス セ ソ タ チ ツ テ ト ナ ニ ヌ ネ ノ ハ ヒ フ ヘ ホ "
          "マ ミ ム メ モ ラ リ ル レ ロ ヴァ ヴェ ヴィ ヴォ ザ ゼ ゾ ガ ギ グ ゲ ゴ ダ デ ド バ ベ ボ "
          "パ ペ ポ").split()
_MORA_CODAS = ["", "", "ン", "ル", "ス", "ク"]

_ORG_SUFFIX = {"en": ["Works", "Foundry", "Guild", "Instruments", "Mills", "Company", "Labs",
                      "Yards", "Engines", "Textiles"],
               "ja": ["工房", "製作所", "商会", "研究所", "機械", "組合"]}


class _Namer:
    """Invented, globally unique name stems; every stem is used once in a world so that no
    name is a word of another (a place "Korrin" and a person "Korrin Vale" would blur
    probes)."""

    def __init__(self, rng: random.Random, lang: str):
        self.rng, self.lang = rng, lang
        self.used: set[str] = set()

    def stem(self, syllables: tuple[int, int] = (2, 3)) -> str:
        for _ in range(10_000):
            n = self.rng.randint(*syllables)
            if self.lang == "ja":
                # One mora more than English syllables: two-mora words are often real words.
                s = "".join(self.rng.choice(_MORAE) for _ in range(n + 1)) + self.rng.choice(_MORA_CODAS)
                bad = s in _REAL_JA
            else:
                parts = [self.rng.choice(_ONSETS if i == 0 else _INNER_ONSETS) + self.rng.choice(_VOWELS)
                         for i in range(n)]
                s = ("".join(parts) + self.rng.choice(_CODAS)).capitalize()
                bad = s.casefold() in _REAL
            if not bad and s.casefold() not in self.used:
                self.used.add(s.casefold())
                return s
        raise RuntimeError("ran out of invented names")  # not reachable for < 10^6 names

    def name(self, etype: str) -> str:
        """A fresh name for an entity of ``etype``."""
        rng, ja = self.rng, self.lang == "ja"
        if etype == "person":
            given, family = self.stem((2, 2)), self.stem((2, 3))
            return f"{given}・{family}" if ja else f"{given} {family}"
        if etype == "organization":
            return self.stem((2, 3)) + ("" if ja else " ") + rng.choice(_ORG_SUFFIX[self.lang])
        if etype == "machine":
            return self.stem((2, 3)) + ("" if ja else " ") + f"{rng.choice('KRTVXZ')}-{rng.randint(2, 99)}"
        if etype == "province":
            return self.stem((3, 3)) + ("州" if ja else "")
        return self.stem((2, 3))  # place, event, set



# --------------------------------------------------------------------------------------------
# Worlds
# --------------------------------------------------------------------------------------------


@dataclass
class World:
    """A rendered synthetic world; :func:`write_world` saves it."""

    kind: str
    lang: str
    seed: int
    paraphrases: int
    facts: list[Fact]
    documents: list[dict]
    """``{"id", "entity", "text"}``; one entity (or one chain / one nest) per document."""
    qa: list[dict]
    """``{"question", "answer", "fact"}`` for ``train`` facts only."""
    probes: list[dict]
    """Probe objects (see ``factlab.evaluate.probes``)."""
    entity_types: dict[str, str] = field(default_factory=dict)
    """Name -> type for every entity named in the facts."""
    decoys: dict[str, list[str]] = field(default_factory=dict)
    """Type -> invented names used only as distractors (never trained)."""

    def summary(self) -> dict:
        """Counts and notes for ``world.json``."""
        probe_kinds = Counter(p["kind"] for p in self.probes)
        return {
            "kind": self.kind,
            "lang": self.lang,
            "seed": self.seed,
            "paraphrases": self.paraphrases,
            "n_facts": len(self.facts),
            "counts": {
                "entities": dict(sorted(Counter(self.entity_types.values()).items())),
                "relations": dict(sorted(Counter(f.relation for f in self.facts).items())),
                "split": dict(sorted(Counter(f.split for f in self.facts).items())),
                "documents": len(self.documents),
                "qa": len(self.qa),
                "probes": dict(sorted(probe_kinds.items())),
            },
            "decoys": {k: list(v) for k, v in sorted(self.decoys.items())},
            "notes": [
                "Every name is invented; a pretrained model cannot know these facts.",
                "Train on the corpus (CPT) and on qa.jsonl (SFT); qa.jsonl covers only facts with split=train.",
                "qa probes ask about split=heldout facts: they measure whether Q&A skill transfers to facts seen only in documents.",
                "paraphrase probes use wordings that appear in no document; recall probes use the trained wording.",
                "reverse probes exist only for one-to-one relations; multihop probes compose two facts (fact = 'f1+f2').",
                "decoys are invented names used only as distractors when the world has too few entities of a type.",
            ],
        }


def _check_size(n: int, what: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_FACTS:
        raise FactlabError(f"{what} must be an integer from 1 to {MAX_FACTS}, got {n!r}")


def _fact_id(i: int, n: int) -> str:
    return f"f{i:0{max(5, len(str(n)))}d}"



class _Distractors:
    """Wrong answers for a world's probes: same-type entities of the world, topped up with
    decoys (invented names of that type, never trained), drawn from the probe stream."""

    def __init__(self, rng: random.Random, namer: _Namer, lang: str):
        self.rng, self.namer, self.lang = rng, namer, lang
        self.decoys: dict[str, list[str]] = {}

    def decoy(self, etype: str, i: int) -> str:
        """The i-th decoy of a type (invented, never trained), created on first use."""
        lst = self.decoys.setdefault(etype, [])
        while len(lst) <= i:
            lst.append(self.namer.name(etype))
        return lst[i]

    def pick(self, pool: list[str], etype: str, bad: Callable[[str], bool],
             preferred: Iterable[str] = ()) -> list[str]:
        """Up to N_DISTRACTORS wrong answers: ``preferred`` first (e.g. upstream events of a
        chain), then random same-type names from ``pool``, then decoys. ``bad(c)`` is true
        for candidates that must not be used (the target, other right answers)."""
        out: list[str] = []

        def take(c: str) -> None:
            if len(out) < N_DISTRACTORS and c not in out and not bad(c):
                out.append(c)

        for c in preferred:
            take(c)
        if len(out) < N_DISTRACTORS and pool:
            # A small random sample is enough in almost every case; scan the whole pool in
            # random order only when most of it is excluded (the head of a long chain).
            for i in self.rng.sample(range(len(pool)), min(len(pool), N_DISTRACTORS + 8)):
                take(pool[i])
            if len(out) < N_DISTRACTORS:
                for i in self.rng.sample(range(len(pool)), len(pool)):
                    take(pool[i])
        i = 0
        while len(out) < N_DISTRACTORS and etype not in _ATTRIBUTE_TYPES:
            take(self.decoy(etype, i))
            i += 1
        return out

    def wrong(self, target: str, etype: str, pools: Mapping[str, list[str]], bad: Callable[[str], bool],
              preferred: Iterable[str] = ()) -> list[str]:
        """Wrong answers for ``target`` of type ``etype``: nearby years, the attribute
        vocabulary, or the world's entities of that type."""
        if etype == "year":
            pool = _year_pool(target, self.rng)
        else:
            pool = _attr_pool(etype, self.lang) or pools.get(etype, [])
        return self.pick(pool, etype, lambda c: c == target or bad(c), preferred)


def _year_pool(target: str, rng: random.Random) -> list[str]:
    """Plausible wrong years near the target."""
    y = int(target)
    return [str(y + d) for d in rng.sample([d for d in range(-40, 41) if d], 12)]


_ATTRIBUTE_TYPES = ("year", "role", "machine_type")


def _attr_pool(etype: str, lang: str) -> list[str] | None:
    return {"role": ROLES[lang], "machine_type": MACHINE_TYPES[lang]}.get(etype)


class _Rendering:
    """One world's renderer and seeded streams: documents and probes each from their own
    stream, so that adding a probe kind never changes the documents."""

    def __init__(self, kind: str, seed: int, lang: str, paraphrases: int, namer: _Namer, facts: list[Fact]):
        self.lang, self.k = lang, paraphrases
        self.r = Renderer(world_plan(facts, lang), lang)
        self.rng_doc = random.Random(f"factlab/{kind}/{seed}/docs/{lang}")
        self.wrong = _Distractors(random.Random(f"factlab/{kind}/{seed}/probes/{lang}"), namer, lang)
        self.recall: dict[str, str] = {}

    def documents(self, groups: list[tuple[str, list[Fact]]]) -> list[dict]:
        docs, self.recall = self.r.documents(groups, self.k, self.rng_doc)
        return docs

    def qa(self, facts: list[Fact]) -> list[dict]:
        """Q&A for the ``train`` split only (``heldout`` facts are asked as ``qa`` probes)."""
        return self.r.qa(facts, lambda f: f.split == "train")

    def probes(self, facts: list[Fact], pools: Mapping[str, list[str]],
               fwd_bad: Callable[[Fact, str], bool] | None = None,
               rev_bad: Callable[[Fact, str], bool] | None = None,
               fwd_prefer: Callable[[Fact], list[str]] | None = None,
               rev_prefer: Callable[[Fact], list[str]] | None = None) -> list[dict]:
        """recall, paraphrase, reverse, qa and multihop probes for ``facts``.

        ``fwd_bad(f, c)`` / ``rev_bad(f, c)``: whether ``c`` would also be a right answer to
        the forward ("f.subject relation ?") or reverse ("? relation f.object") question, so it
        must not be a distractor; the defaults use the facts themselves. ``*_prefer``: names to
        try first as distractors (chains: the events on the wrong side of the arrow).
        """
        index = FactIndex(facts)
        fwd_bad = fwd_bad or (lambda f, c: c == f.subject or c in index.objects_of(f.subject, f.relation))
        rev_bad = rev_bad or (lambda f, c: c == f.object or c in index.subjects_of(f.object, f.relation))
        wrong, rng = self.wrong, self.wrong.rng

        def paraphrase(f: Fact) -> list[tuple[str, str, bool]]:
            heldout = self.r.plan[f.relation].heldout  # one held-out wording per fact, drawn
            return [("para", prefix(heldout[rng.randrange(len(heldout))], "o", s=f.subject), False)]

        out, _ = self.r.probes(
            facts, self.recall,
            forward=lambda f: wrong.wrong(f.object, f.object_type, pools, lambda c: fwd_bad(f, c),
                                          fwd_prefer(f) if fwd_prefer else ()),
            backward=lambda f: wrong.wrong(f.subject, f.subject_type, pools, lambda c: rev_bad(f, c),
                                           rev_prefer(f) if rev_prefer else ()),
            paraphrases=paraphrase, qa=lambda f: f.split == "heldout")
        for f1 in facts:
            for rel1, rel2, template in MULTIHOP[self.lang]:
                f2 = index.fact.get((f1.object, rel2)) if f1.relation == rel1 else None
                if f2 is None:
                    continue
                hop_bad = lambda c: c in (f1.subject, f1.object) or c in index.objects_of(f1.object, rel2)  # noqa: E731
                d = wrong.wrong(f2.object, f2.object_type, pools, hop_bad)
                out.append(probe(f"{f1.id}+{f2.id}-hop", f"{f1.id}+{f2.id}", "multihop",
                                 prefix(template, "o", s=f1.subject), f2.object, d))
        return out


def _entity_types(facts: list[Fact]) -> dict[str, str]:
    types: dict[str, str] = {}
    for f in facts:
        types.setdefault(f.subject, f.subject_type)
        if f.object_type not in _ATTRIBUTE_TYPES:
            types.setdefault(f.object, f.object_type)
    return types


def _pools(types: Mapping[str, str]) -> dict[str, list[str]]:
    pools: dict[str, list[str]] = {}
    for name, t in types.items():
        pools.setdefault(t, []).append(name)
    return pools


def _split_subjects(facts: list[Fact], rng: random.Random, heldout: float) -> dict[str, str]:
    """Subject -> split. Whole subjects are held out (all their facts), as in the
    biography studies: Q&A on half the people, test Q&A on the other half."""
    subjects = list(dict.fromkeys(f.subject for f in facts))
    rng.shuffle(subjects)
    n_held = round(len(subjects) * heldout)
    if 0 < heldout < 1 and len(subjects) >= 2:
        n_held = min(max(n_held, 1), len(subjects) - 1)  # both splits non-empty
    return {s: ("heldout" if i < n_held else "train") for i, s in enumerate(subjects)}


def _with_split(facts: list[Fact], split: Mapping[str, str]) -> list[Fact]:
    return [replace(f, split=split[f.subject]) for f in facts]


def _check_args(n: int, seed: int, lang: str, paraphrases: int, heldout: float, what: str) -> None:
    _check_size(n, what)
    check_lang(lang)
    if not isinstance(seed, int):
        raise FactlabError(f"seed must be an integer, got {seed!r}")
    if not isinstance(paraphrases, int) or not 1 <= paraphrases <= 20:
        raise FactlabError(f"paraphrases must be an integer from 1 to 20, got {paraphrases!r}")
    if not 0 <= heldout < 1:
        raise FactlabError(f"heldout must be a fraction in [0, 1), got {heldout!r}")


def synth_world(n_facts: int, seed: int = 0, lang: str = "en", paraphrases: int = 1,
                heldout: float = 0.5) -> World:
    """A fictional world of exactly ``n_facts`` facts (see the module docstring).

    ``paraphrases``: documents per entity, each with different wordings and sentence order
    (wordings repeat, in new orders, beyond the 3 templates per relation).
    ``heldout``: the share of subjects whose facts get no Q&A pairs and are asked as ``qa``
    probes instead.
    """
    _check_args(n_facts, seed, lang, paraphrases, heldout, "n_facts")
    rng = random.Random(f"factlab/world/{seed}/graph")
    # -- 1. graph, with ids; language-independent ---------------------------------------
    n_places = max(3, n_facts // 20)
    n_provinces = max(2, n_places // 5)
    raw: list[tuple[str, str, str | int]] = []  # (subject id, relation, object id | attribute)
    described: set[str] = set()

    def place(i: int) -> str:
        pid = f"plc{i:05d}"
        if pid not in described:  # introduce a town (its province) before first use
            described.add(pid)
            raw.append((pid, "in_province", f"prv{rng.randrange(n_provinces):05d}"))
        return pid

    u = 0
    while len(raw) < n_facts:
        org, per, mac = f"org{u:05d}", f"per{u:05d}", f"mac{u:05d}"
        raw.append((org, "located_in", place(rng.randrange(n_places))))
        raw.append((org, "founded_in", rng.randint(1780, 1990)))
        raw.append((per, "works_at", org))
        raw.append((per, "born_in", place(rng.randrange(n_places))))
        raw.append((per, "role", rng.randrange(len(ROLES["en"]))))
        raw.append((per, "born_year", rng.randint(1900, 1995)))
        raw.append((mac, "made_by", org))
        raw.append((mac, "machine_type", rng.randrange(len(MACHINE_TYPES["en"]))))
        u += 1
    raw = raw[:n_facts]

    # -- 2. names, in order of first appearance ------------------------------------------
    namer = _Namer(random.Random(f"factlab/world/{seed}/names/{lang}"), lang)
    id_type = {"org": "organization", "per": "person", "mac": "machine", "plc": "place", "prv": "province"}
    names: dict[str, str] = {}

    def name(eid: str) -> str:
        if eid not in names:
            names[eid] = namer.name(id_type[eid[:3]])
        return names[eid]

    facts: list[Fact] = []
    for i, (s, rel, o) in enumerate(raw, 1):
        spec = RELATIONS[lang][rel]
        if rel == "role":
            obj = ROLES[lang][o]
        elif rel == "machine_type":
            obj = MACHINE_TYPES[lang][o]
        elif isinstance(o, int):
            obj = str(o)
        else:
            obj = name(o)
        facts.append(Fact(name(s), rel, obj, _fact_id(i, n_facts), "train", spec.subject_type, spec.object_type))
    split = _split_subjects(facts, random.Random(f"factlab/world/{seed}/split"), heldout)
    facts = _with_split(facts, split)

    # -- 3. rendering -------------------------------------------------------------------
    r = _Rendering("world", seed, lang, paraphrases, namer, facts)
    id_of = {v: k for k, v in names.items()}
    groups: dict[str, list[Fact]] = {}
    for f in facts:
        groups.setdefault(id_of[f.subject], []).append(f)
    documents = r.documents(list(groups.items()))
    types = _entity_types(facts)
    probes = r.probes(facts, _pools(types)) + locality_probes(lang)
    return World("world", lang, seed, paraphrases, facts, documents, r.qa(facts), in_kind_order(probes),
                 types, r.wrong.decoys)


def synth_chain(length: int, seed: int = 0, lang: str = "en", paraphrases: int = 1,
                heldout: float = 0.5) -> World:
    """A causal chain of ``length`` links between ``length + 1`` invented events:
    "A causes B.", "B causes C.", ...

    Probes: forward (``recall``/``paraphrase``: "A causes" -> B; wrong answers are upstream
    events or decoys, never downstream ones, which A arguably also causes), ``reverse``
    ("B is caused by" -> A), transitive (``multihop``: "A indirectly causes" -> C, wrong
    answers upstream), and contradicting (``qa`` yes/no: "Does B cause A?" -> "No", balanced
    by "Does A cause B?" -> "Yes"): a model that learned the links as symmetric says yes to
    both. Documents: ``paraphrases`` copies of the whole chain, sentences shuffled (the
    order of the text must not give the order of the chain away).
    """
    _check_args(length, seed, lang, paraphrases, heldout, "length")
    namer = _Namer(random.Random(f"factlab/chain/{seed}/names/{lang}"), lang)
    nodes = [namer.name("event") for _ in range(length + 1)]
    facts = [Fact(nodes[i], "causes", nodes[i + 1], _fact_id(i + 1, length), "train", "event", "event")
             for i in range(length)]
    split = _split_subjects(facts, random.Random(f"factlab/chain/{seed}/split"), heldout)
    facts = _with_split(facts, split)
    r = _Rendering("chain", seed, lang, paraphrases, namer, facts)
    documents = r.documents([("chain", facts)])
    pos = {n: i for i, n in enumerate(nodes)}
    # Forward "A causes ?": every downstream event is arguably right (A causes it through
    # the chain), so wrong answers are upstream events (nearest first), then decoys.
    # Reverse "? causes B": every upstream event is arguably right; wrong answers downstream.
    probes = r.probes(
        facts, {"event": nodes},
        fwd_bad=lambda f, c: c in pos and pos[c] >= pos[f.subject],
        rev_bad=lambda f, c: c in pos and pos[c] <= pos[f.object],
        fwd_prefer=lambda f: nodes[max(0, pos[f.subject] - N_DISTRACTORS): pos[f.subject]][::-1],
        rev_prefer=lambda f: nodes[pos[f.object] + 1: pos[f.object] + 1 + N_DISTRACTORS])
    # transitive: two links ahead ("indirectly"); wrong answers: upstream events, decoys
    for i in range(length - 1):
        s, o = nodes[i], nodes[i + 2]
        d = r.wrong.pick([], "event", lambda c, i=i: c in pos and pos[c] >= i,
                         nodes[max(0, i - N_DISTRACTORS): i][::-1])
        probes.append(probe(f"{facts[i].id}+{facts[i + 1].id}-hop", f"{facts[i].id}+{facts[i + 1].id}",
                            "multihop", prefix(CHAIN_INDIRECT[lang], "o", s=s), o, d))
    yes, no = YES_NO[lang]
    for f in facts:
        probes.append(probe(f"{f.id}-contra", f.id, "qa", fill(CHAIN_ASK[lang], s=f.object, o=f.subject), no, [yes]))
        probes.append(probe(f"{f.id}-affirm", f.id, "qa", fill(CHAIN_ASK[lang], s=f.subject, o=f.object), yes, [no]))
    return World("chain", lang, seed, paraphrases, facts, documents, r.qa(facts), in_kind_order(probes),
                 _entity_types(facts), r.wrong.decoys)


def synth_containment(n: int, seed: int = 0, lang: str = "en", paraphrases: int = 1,
                      heldout: float = 0.5) -> World:
    """``n`` containment facts "A is in B." over nests of three sets (A in B, B in C).

    Each set holds one set directly, so the reverse question "B contains" has one answer.
    Probes: forward (``recall``/``paraphrase``: "A is in" -> B; wrong answers exclude C,
    which contains A too), ``reverse`` ("B contains" -> A), ``multihop`` ("A is in something
    that is in" -> C) and ``qa`` for held-out facts. One document per nest.
    """
    _check_args(n, seed, lang, paraphrases, heldout, "n")
    namer = _Namer(random.Random(f"factlab/containment/{seed}/names/{lang}"), lang)
    facts: list[Fact] = []
    groups: list[tuple[str, list[Fact]]] = []
    contains: dict[str, str] = {}  # set -> the set it is directly in
    g = 0
    while len(facts) < n:
        a, b, c = (namer.name("set") for _ in range(3))
        nest = []
        for s, o in ((a, b), (b, c))[: n - len(facts)]:
            f = Fact(s, "is_in", o, _fact_id(len(facts) + 1, n), "train", "set", "set")
            facts.append(f)
            nest.append(f)
        contains.update({a: b, b: c})
        groups.append((f"nest{g:05d}", nest))
        g += 1
    split = _split_subjects(facts, random.Random(f"factlab/containment/{seed}/split"), heldout)
    facts = _with_split(facts, split)
    by_id = {f.id: f for f in facts}
    groups = [(gid, [by_id[f.id] for f in fs]) for gid, fs in groups]
    r = _Rendering("containment", seed, lang, paraphrases, namer, facts)
    documents = r.documents(groups)
    types = _entity_types(facts)

    def ancestors(x: str) -> set[str]:
        out = set()
        while x in contains:
            x = contains[x]
            out.add(x)
        return out

    # "A is in ?": C holds A too (through B), so it is no wrong answer; likewise
    # "C contains ?": A is in C too.
    probes = r.probes(facts, _pools(types),
                      fwd_bad=lambda f, c: c == f.subject or c in ancestors(f.subject),
                      rev_bad=lambda f, c: c == f.object or f.object in ancestors(c))
    return World("containment", lang, seed, paraphrases, facts, documents, r.qa(facts), in_kind_order(probes),
                 types, r.wrong.decoys)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_world(world: World, out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write the world's files; returns ``{"corpus", "qa", "probes", "facts", "summary"}``.

    ``corpus`` is the ``docs/`` folder: one ``.txt`` per document for small worlds,
    ``docs/corpus.jsonl`` beyond ``factlab.data.writer.DOCS_AS_FILES_MAX`` documents; both load with
    ``factlab.data.corpus.load_documents``. Written atomically by ``factlab.data.writer``; a
    non-empty ``out_dir`` is refused unless ``overwrite``, then only factlab's own outputs are
    replaced.
    """
    summary = world.summary()
    summary["files"] = {"corpus": "docs/", "qa": "qa.jsonl", "probes": "probes.jsonl", "facts": "facts.jsonl"}
    out = Path(out_dir)
    docs = write_data_folder(out, world.documents, {
        "qa.jsonl": jsonl_text(world.qa),
        "probes.jsonl": jsonl_text(world.probes),
        "facts.jsonl": jsonl_text(f.to_dict() for f in world.facts),
        "world.json": json_text(summary),
    }, overwrite=overwrite)
    return {"corpus": docs, **{k: out / v for k, v in summary["files"].items() if k != "corpus"},
            "summary": out / "world.json"}
