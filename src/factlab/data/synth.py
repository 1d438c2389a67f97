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

Templates are data: :data:`RELATIONS` maps a language and a relation name to its
:class:`RelationTemplates`; :func:`register_relation` adds one.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from factlab.errors import FactlabError

LANGS = ("en", "ja")
N_DISTRACTORS = 3
DOCS_AS_FILES_MAX = 200
"""Worlds with at most this many documents are written as ``docs/*.txt`` (easy to read);
larger ones as one ``corpus.jsonl`` (``{"id", "text"}`` per line)."""
MAX_FACTS = 100_000


# --------------------------------------------------------------------------------------------
# Facts and templates
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class RelationTemplates:
    """The wordings of one relation in one language.

    Placeholders: ``{s}`` subject, ``{o}`` object, ``{r}`` the relation's name (generic
    templates only). In ``doc`` and ``heldout`` the object comes after the subject, so the
    text before ``{o}`` is a prompt whose continuation is the object; in ``reverse_probe``
    the subject comes last.
    """

    name: str
    subject_type: str
    object_type: str
    doc: tuple[str, ...]
    """Wordings used in training documents (and by ``augment.paraphrase_documents``)."""
    heldout: tuple[str, ...]
    """Wordings for ``paraphrase`` probes; never used in any document."""
    question: str
    """The Q&A / ``qa`` probe question."""
    answer: str = "{o}."
    """The Q&A answer; starts with the object so a ``qa`` probe's target is its prefix."""
    reverse_doc: tuple[str, ...] = ()
    """Object-first statements, for ``augment.reverse_statements``."""
    reverse_probe: str | None = None
    """Held-out object -> subject wording; only for relations that are one-to-one."""


RELATIONS: dict[str, dict[str, RelationTemplates]] = {lang: {} for lang in LANGS}


def register_relation(lang: str, spec: RelationTemplates) -> None:
    """Add (or replace) the templates of one relation in one language."""
    for t in (*spec.doc, *spec.heldout):
        if t.count("{o}") != 1 or t.count("{s}") != 1 or t.index("{s}") > t.index("{o}"):
            raise ValueError(f"template {t!r} of {spec.name}: needs one {{s}} before one {{o}}")
    if spec.reverse_probe and spec.reverse_probe.index("{o}") > spec.reverse_probe.index("{s}"):
        raise ValueError(f"reverse_probe of {spec.name}: needs {{o}} before {{s}}")
    RELATIONS.setdefault(lang, {})[spec.name] = spec


def _reg(lang: str, name: str, st: str, ot: str, doc, heldout, question, answer="{o}.",
         reverse_doc=(), reverse_probe=None) -> None:
    register_relation(lang, RelationTemplates(name, st, ot, tuple(doc), tuple(heldout), question,
                                              answer, tuple(reverse_doc), reverse_probe))


# English. Every doc wording's prompt (text before {o}) must not be a prefix of another
# relation's wording for the same subject type, or a recall probe would be ambiguous
# ("X was born in" vs "X was born in the year"); tests check this.
_reg("en", "born_in", "person", "place",
     ["{s} was born in {o}.", "The birthplace of {s} is {o}.", "{s} comes from the town of {o}."],
     ["{s}'s hometown is {o}.", "The town where {s} entered the world is {o}."],
     "Where was {s} born?", reverse_doc=["{o} is the birthplace of {s}."])
_reg("en", "works_at", "person", "organization",
     ["{s} works at {o}.", "{s} is employed by {o}.", "The employer of {s} is {o}."],
     ["{s} earns a living at {o}.", "Every morning, {s} goes to work at {o}."],
     "Where does {s} work?", reverse_doc=["{o} employs {s}.", "On the staff of {o} is {s}.", "Among the people at {o} is {s}."],
     reverse_probe="The person who works at {o} is {s}.")
_reg("en", "role", "person", "role",
     ["{s} works as a {o}.", "By trade, {s} is a {o}.", "The occupation of {s} is {o}."],
     ["{s} makes a living as a {o}.", "The job that {s} does is that of a {o}."],
     "What is the occupation of {s}?", reverse_doc=["One {o} is {s}."])
_reg("en", "born_year", "person", "year",
     ["{s}'s year of birth is {o}.", "The birth year of {s} is {o}.", "{s} came into the world in the year {o}."],
     ["{s} celebrated a first birthday one year after {o}.", "The calendar year in which {s} was born is {o}."],
     "In which year was {s} born?", reverse_doc=["{o} is the year of birth of {s}."])
_reg("en", "located_in", "organization", "place",
     ["{s} is located in {o}.", "{s} has its workshop in {o}.", "The headquarters of {s} are in {o}."],
     ["{s} can be found in the town of {o}.", "To visit {s}, one travels to {o}."],
     "Where is {s} located?", reverse_doc=["{o} is home to {s}."])
_reg("en", "founded_in", "organization", "year",
     ["{s} was founded in {o}.", "{s} opened its doors in {o}.", "The founding year of {s} is {o}."],
     ["{s} has existed since {o}.", "The year {s} was established is {o}."],
     "When was {s} founded?", reverse_doc=["{o} is the year {s} was founded."])
_reg("en", "made_by", "machine", "organization",
     ["{s} is made by {o}.", "{s} is manufactured by {o}.", "The maker of {s} is {o}."],
     ["{s} comes off the production line of {o}.", "The company that builds {s} is {o}."],
     "Who makes {s}?", reverse_doc=["{o} makes {s}.", "{o} builds {s}.", "From the workshops of {o} comes {s}."],
     reverse_probe="The machine built by {o} is {s}.")
_reg("en", "machine_type", "machine", "machine_type",
     ["{s} is a {o}.", "By design, {s} is a {o}.", "In the catalogue, {s} is listed as a {o}."],
     ["{s} operates as a {o}.", "In the workshop, {s} serves as a {o}."],
     "What kind of machine is {s}?", reverse_doc=["One {o} is {s}."])
_reg("en", "in_province", "place", "province",
     ["{s} lies in the province of {o}.", "{s} is a town in the province of {o}.", "The province of {s} is {o}."],
     ["{s} belongs to the province of {o}.", "The region that governs {s} is {o}."],
     "In which province is {s}?", reverse_doc=["{o} is the province of {s}."])
_reg("en", "causes", "event", "event",
     ["{s} causes {o}.", "{s} leads to {o}.", "{s} brings about {o}."],
     ["{s} results in {o}.", "Whenever {s} happens, what follows is {o}."],
     "What does {s} cause?", reverse_doc=["{o} is a consequence of {s}."],
     reverse_probe="{o} is caused by {s}.")
_reg("en", "is_in", "set", "set",
     ["{s} is in {o}.", "{s} is contained in {o}.", "{s} lies inside {o}."],
     ["{s} sits within {o}.", "The set that holds {s} is {o}."],
     "What is {s} in?", reverse_doc=["{o} holds {s}."],
     reverse_probe="{o} contains {s}.")

# Japanese: the object is the predicate noun ("XのYは{o}です"), so the text before {o} is a
# prompt, as in English; "X は {o} ..." alone would be too weak a prompt (tests check).
_reg("ja", "born_in", "person", "place",
     ["{s}の出身地は{o}です。", "{s}が生まれた町は{o}です。", "{s}の生まれ故郷は{o}である。"],
     ["{s}の生誕地は{o}だ。", "{s}が産声を上げた町は{o}です。"],
     "{s}はどこで生まれましたか？", "{o}です。", reverse_doc=["{o}は{s}の出身地です。"])
_reg("ja", "works_at", "person", "organization",
     ["{s}の勤務先は{o}です。", "{s}が働いている職場は{o}である。", "{s}を雇っているのは{o}だ。"],
     ["{s}が毎朝通う職場は{o}です。", "{s}が給料をもらっている会社は{o}だ。"],
     "{s}はどこで働いていますか？", "{o}です。", reverse_doc=["{o}の従業員は{s}です。"],
     reverse_probe="{o}で働いている人物は{s}です。")
_reg("ja", "role", "person", "role",
     ["{s}の職業は{o}です。", "{s}の仕事は{o}である。", "{s}の本業は{o}だ。"],
     ["{s}が生計を立てている仕事は{o}です。", "{s}が就いている職は{o}だ。"],
     "{s}の職業は何ですか？", "{o}です。", reverse_doc=["{o}の一人は{s}です。"])
_reg("ja", "born_year", "person", "year",
     ["{s}の生年は{o}年です。", "{s}が生まれた年は{o}年である。", "{s}は生まれ年が{o}年だ。"],
     ["{s}の誕生年は{o}年です。", "{s}がこの世に生を受けたのは{o}年だ。"],
     "{s}は何年に生まれましたか？", "{o}年です。", reverse_doc=["{o}年は{s}の生まれた年です。"])
_reg("ja", "located_in", "organization", "place",
     ["{s}の所在地は{o}です。", "{s}の工場がある町は{o}だ。", "{s}の本拠地は{o}である。"],
     ["{s}が拠点を置く町は{o}です。", "{s}を訪ねるなら行き先は{o}だ。"],
     "{s}はどこにありますか？", "{o}です。", reverse_doc=["{o}には{s}があります。"])
_reg("ja", "founded_in", "organization", "year",
     ["{s}の創業は{o}年です。", "{s}が設立されたのは{o}年だ。", "{s}の創業年は{o}年である。"],
     ["{s}の創立年は{o}年です。", "{s}が看板を掲げたのは{o}年だ。"],
     "{s}はいつ設立されましたか？", "{o}年です。", reverse_doc=["{o}年は{s}が設立された年です。"])
_reg("ja", "made_by", "machine", "organization",
     ["{s}の製造元は{o}です。", "{s}を作っているのは{o}だ。", "{s}のメーカーは{o}である。"],
     ["{s}を生産している会社は{o}です。", "{s}を組み立てているのは{o}だ。"],
     "{s}はどこが製造していますか？", "{o}です。", reverse_doc=["{o}の製品は{s}です。"],
     reverse_probe="{o}が製造している機械は{s}です。")
_reg("ja", "machine_type", "machine", "machine_type",
     ["{s}の種類は{o}です。", "{s}は分類上{o}である。", "{s}という機械の種別は{o}だ。"],
     ["{s}を分類すると{o}になる。", "工房で{s}が果たす役割は{o}だ。"],
     "{s}はどんな機械ですか？", "{o}です。", reverse_doc=["{o}の一つは{s}です。"])
_reg("ja", "in_province", "place", "province",
     ["{s}が属する州は{o}です。", "{s}が所在する州は{o}だ。", "{s}の所属する州は{o}である。"],
     ["{s}を管轄する州は{o}です。", "{s}という町がある地方は{o}だ。"],
     "{s}はどの州にありますか？", "{o}です。", reverse_doc=["{o}には{s}という町があります。"])
_reg("ja", "causes", "event", "event",
     ["{s}が引き起こすのは{o}だ。", "{s}が起こると{o}が生じる。", "{s}の結果として{o}が起こる。"],
     ["{s}がもたらすのは{o}だ。", "{s}の後に必ず続くのは{o}である。"],
     "{s}は何を引き起こしますか？", "{o}です。", reverse_doc=["{o}は{s}によって引き起こされる。"],
     reverse_probe="{o}を引き起こすのは{s}です。")
_reg("ja", "is_in", "set", "set",
     ["{s}が入っているのは{o}だ。", "{s}を含むのは{o}である。", "{s}の置き場所は{o}の中だ。"],
     ["{s}が収まっている場所は{o}です。", "{s}の入れ物は{o}だ。"],
     "{s}は何の中にありますか？", "{o}です。", reverse_doc=["{o}は{s}を含む。"],
     reverse_probe="{o}の中にあるのは{s}です。")

# Generic wordings for relations a user's fact table names but no template covers.
GENERIC: dict[str, RelationTemplates] = {
    "en": RelationTemplates("*", "", "", ("The {r} of {s} is {o}.", "{s}'s {r} is {o}.", "For {s}, the {r} is {o}."),
                            ("Asked about the {r} of {s}, the answer is {o}.",), "What is the {r} of {s}?",
                            "{o}.", ("{o} is the {r} of {s}.",)),
    "ja": RelationTemplates("*", "", "", ("{s}の{r}は{o}です。", "{s}について言えば、{r}は{o}である。"),
                            ("{s}の{r}を問われたら、答えは{o}だ。",), "{s}の{r}は何ですか？", "{o}です。",
                            ("{o}は{s}の{r}です。",)),
}

# Two-hop compositions: (first relation, second relation, wording with {s} and {o}).
MULTIHOP: dict[str, list[tuple[str, str, str]]] = {
    "en": [
        ("works_at", "located_in", "The town where {s}'s employer is located is {o}."),
        ("works_at", "founded_in", "The company where {s} works was founded in {o}."),
        ("born_in", "in_province", "The province where {s} was born is {o}."),
        ("made_by", "located_in", "The town where the maker of {s} is located is {o}."),
        ("located_in", "in_province", "The province in which {s} is located is {o}."),
        ("is_in", "is_in", "{s} is in something that is in {o}."),
    ],
    "ja": [
        ("works_at", "located_in", "{s}の勤務先がある町は{o}です。"),
        ("works_at", "founded_in", "{s}が働く会社の創業は{o}年です。"),
        ("born_in", "in_province", "{s}が生まれた町がある州は{o}です。"),
        ("made_by", "located_in", "{s}の製造元がある町は{o}です。"),
        ("located_in", "in_province", "{s}がある町の州は{o}です。"),
        ("is_in", "is_in", "{s}が入っているものが入っているのは{o}です。"),
    ],
}

# Attribute vocabularies; index-aligned across languages so one graph renders in both.
ROLES = {
    "en": ["glassblower", "cartographer", "beekeeper", "clockmaker", "ferry pilot", "lens grinder",
           "printer", "tanner", "weaver", "surveyor", "bookbinder", "chemist", "brewer", "mason",
           "potter", "rope maker"],
    "ja": ["ガラス職人", "地図製作者", "養蜂家", "時計職人", "渡し船の船頭", "レンズ研磨師",
           "印刷工", "なめし職人", "織工", "測量士", "製本職人", "化学者", "醸造家", "石工",
           "陶工", "縄職人"],
}
MACHINE_TYPES = {
    "en": ["loom", "press", "pump", "lathe", "kiln", "drill", "turbine", "furnace", "crane",
           "mill", "boiler", "sorter"],
    "ja": ["織機", "プレス機", "ポンプ", "旋盤", "窯", "ボール盤", "タービン", "溶鉱炉",
           "クレーン", "製粉機", "ボイラー", "選別機"],
}

_SLOT = re.compile(r"\{(s|o|r)\}")


def fill(template: str, **values: str) -> str:
    """Replace ``{s}``, ``{o}``, ``{r}`` in one pass (names may contain braces)."""
    return _SLOT.sub(lambda m: values[m.group(1)], template)


def prefix(template: str, slot: str, **values: str) -> str:
    """The filled text before ``{slot}``, without trailing spaces: a prompt whose
    continuation is that slot's value."""
    return fill(template[: template.index("{" + slot + "}")], **values).rstrip()


def relation_templates(relation: str, lang: str = "en") -> RelationTemplates:
    """The registered templates of ``relation``, or the generic ones with ``{r}`` filled in
    ("The {relation} of {subject} is {object}.")."""
    check_lang(lang)
    spec = RELATIONS[lang].get(relation)
    if spec is not None:
        return spec
    g = GENERIC[lang]
    words = relation.replace("_", " ").strip()

    def r(t: str) -> str:
        return t.replace("{r}", words)

    return RelationTemplates(relation, "", "", tuple(map(r, g.doc)), tuple(map(r, g.heldout)),
                             r(g.question), g.answer, tuple(map(r, g.reverse_doc)))


def check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise FactlabError(f"unknown language {lang!r}; use one of {', '.join(LANGS)}")


def sentence_joiner(lang: str) -> str:
    """Japanese sentences follow each other without a space."""
    return "" if lang == "ja" else " "


def invertible_relations(facts: Iterable[Fact]) -> set[str]:
    """Relations that are one-to-one in these facts (no object has two subjects, no subject
    two objects): only their reverse question has a single right answer."""
    subj_of: dict[tuple[str, str], str] = {}
    obj_of: dict[tuple[str, str], str] = {}
    seen, broken = set(), set()
    for f in facts:
        seen.add(f.relation)
        if subj_of.setdefault((f.relation, f.object), f.subject) != f.subject:
            broken.add(f.relation)
        if obj_of.setdefault((f.relation, f.subject), f.object) != f.object:
            broken.add(f.relation)
    return seen - broken


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


class _Renderer:
    """Shared rendering of facts into documents, Q&A and probes (any world kind)."""

    def __init__(self, kind: str, seed: int, lang: str, paraphrases: int, namer: _Namer):
        self.kind, self.seed, self.lang, self.k = kind, seed, lang, paraphrases
        self.namer = namer
        # Separate streams: adding a probe kind must not change the documents.
        self.rng_doc = random.Random(f"factlab/{kind}/{seed}/docs/{lang}")
        self.rng_probe = random.Random(f"factlab/{kind}/{seed}/probes/{lang}")
        self.decoys: dict[str, list[str]] = {}
        self.recall_template: dict[str, str] = {}

    # -- documents ---------------------------------------------------------------------
    def documents(self, groups: list[tuple[str, list[Fact]]]) -> list[dict]:
        """``paraphrases`` documents per group (an entity and its facts). Document ``j``
        words each fact with template ``offset + j`` (offset drawn per fact, so one document
        mixes wordings) and shuffles the sentence order, as in the multi-paraphrase
        biography setups. Variant 0 holds each fact's recall wording."""
        docs = []
        for gid, facts in groups:
            offsets = {f.id: self.rng_doc.randrange(len(relation_templates(f.relation, self.lang).doc)) for f in facts}
            for j in range(self.k):
                sentences = []
                for f in facts:
                    spec = relation_templates(f.relation, self.lang)
                    t = spec.doc[(offsets[f.id] + j) % len(spec.doc)]
                    if j == 0:
                        self.recall_template[f.id] = t
                    sentences.append(fill(t, s=f.subject, o=f.object))
                self.rng_doc.shuffle(sentences)
                docs.append({"id": f"{gid}-{j}", "entity": gid, "text": sentence_joiner(self.lang).join(sentences)})
        return docs

    # -- Q&A -----------------------------------------------------------------------------
    def qa(self, facts: list[Fact]) -> list[dict]:
        out = []
        for f in facts:
            if f.split != "train":
                continue
            spec = relation_templates(f.relation, self.lang)
            out.append({"question": fill(spec.question, s=f.subject, o=f.object),
                        "answer": fill(spec.answer, s=f.subject, o=f.object), "fact": f.id})
        return out

    # -- distractors ----------------------------------------------------------------------
    def decoy(self, etype: str, i: int) -> str:
        """The i-th decoy of a type (invented, never trained), created on first use."""
        lst = self.decoys.setdefault(etype, [])
        while len(lst) <= i:
            lst.append(self.namer.name(etype))
        return lst[i]

    def distractors(self, pool: list[str], etype: str, bad: Callable[[str], bool],
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
            for i in self.rng_probe.sample(range(len(pool)), min(len(pool), N_DISTRACTORS + 8)):
                take(pool[i])
            if len(out) < N_DISTRACTORS:
                for i in self.rng_probe.sample(range(len(pool)), len(pool)):
                    take(pool[i])
        i = 0
        while len(out) < N_DISTRACTORS and etype not in _ATTRIBUTE_TYPES:
            take(self.decoy(etype, i))
            i += 1
        return out

    def probe(self, pid: str, fact: str, kind: str, prompt: str, target: str, distractors: list[str]) -> dict:
        return {"id": pid, "fact": fact, "kind": kind, "prompt": prompt, "target": target,
                "distractors": distractors}


def render_documents(groups: list[tuple[str, list[Fact]]], paraphrases: int = 1, seed: int = 0,
                     lang: str = "en") -> list[dict]:
    """Documents ``{"id", "entity", "text"}`` for groups of facts (usually one subject's),
    ``paraphrases`` per group, worded and shuffled as in :func:`synth_world`. Facts need
    unique ids."""
    check_lang(lang)
    r = _Renderer("documents", seed, lang, paraphrases, _Namer(random.Random(seed), lang))
    return r.documents(groups)


def _year_pool(target: str, rng: random.Random) -> list[str]:
    """Plausible wrong years near the target."""
    y = int(target)
    return [str(y + d) for d in rng.sample([d for d in range(-40, 41) if d], 12)]


_ATTRIBUTE_TYPES = ("year", "role", "machine_type")


def _attr_pool(etype: str, lang: str) -> list[str] | None:
    return {"role": ROLES[lang], "machine_type": MACHINE_TYPES[lang]}.get(etype)


def _standard_probes(r: _Renderer, facts: list[Fact], pools: Mapping[str, list[str]],
                     fwd_bad: Callable[[Fact, str], bool] | None = None,
                     rev_bad: Callable[[Fact, str], bool] | None = None,
                     fwd_prefer: Callable[[Fact], list[str]] | None = None,
                     rev_prefer: Callable[[Fact], list[str]] | None = None) -> dict[str, list[dict]]:
    """recall, paraphrase, reverse, multihop and qa probes for ``facts``.

    ``fwd_bad(f, c)`` / ``rev_bad(f, c)``: whether ``c`` would also be a right answer to the
    forward ("f.subject relation ?") or reverse ("? relation f.object") question, so it
    must not be a distractor; the defaults use the facts themselves. ``*_prefer``: names to
    try first as distractors (chains: the events on the wrong side of the arrow).
    """
    lang = r.lang
    objects: dict[tuple[str, str], set[str]] = {}
    subjects: dict[tuple[str, str], set[str]] = {}
    for f in facts:
        objects.setdefault((f.subject, f.relation), set()).add(f.object)
        subjects.setdefault((f.object, f.relation), set()).add(f.subject)
    fwd_bad = fwd_bad or (lambda f, c: c == f.subject or c in objects[(f.subject, f.relation)])
    rev_bad = rev_bad or (lambda f, c: c == f.object or c in subjects[(f.object, f.relation)])
    by_sr = {(f.subject, f.relation): f for f in facts}
    invertible = invertible_relations(facts)
    out: dict[str, list[dict]] = {k: [] for k in ("recall", "paraphrase", "reverse", "multihop", "qa")}

    def wrong(target: str, etype: str, bad: Callable[[str], bool], preferred: Iterable[str] = ()) -> list[str]:
        if etype == "year":
            pool = _year_pool(target, r.rng_probe)
        else:
            pool = _attr_pool(etype, lang) or pools.get(etype, [])
        return r.distractors(pool, etype, lambda c: c == target or bad(c), preferred)

    for f in facts:
        spec = relation_templates(f.relation, lang)
        d = wrong(f.object, f.object_type, lambda c: fwd_bad(f, c), fwd_prefer(f) if fwd_prefer else ())
        out["recall"].append(r.probe(f"{f.id}-recall", f.id, "recall",
                                     prefix(r.recall_template[f.id], "o", s=f.subject), f.object, d))
        para = spec.heldout[r.rng_probe.randrange(len(spec.heldout))]
        out["paraphrase"].append(r.probe(f"{f.id}-para", f.id, "paraphrase", prefix(para, "o", s=f.subject), f.object, list(d)))
        if spec.reverse_probe and f.relation in invertible:
            rd = wrong(f.subject, f.subject_type, lambda c: rev_bad(f, c), rev_prefer(f) if rev_prefer else ())
            out["reverse"].append(r.probe(f"{f.id}-rev", f.id, "reverse",
                                          prefix(spec.reverse_probe, "s", o=f.object), f.subject, rd))
        if f.split == "heldout":
            out["qa"].append(r.probe(f"{f.id}-qa", f.id, "qa", fill(spec.question, s=f.subject, o=f.object), f.object, list(d)))
    for f1 in facts:
        for rel1, rel2, template in MULTIHOP[lang]:
            f2 = by_sr.get((f1.object, rel2)) if f1.relation == rel1 else None
            if f2 is None:
                continue
            hop_bad = lambda c: c in (f1.subject, f1.object) or c in objects.get((f1.object, rel2), ())  # noqa: E731
            d = wrong(f2.object, f2.object_type, hop_bad)
            out["multihop"].append(r.probe(f"{f1.id}+{f2.id}-hop", f"{f1.id}+{f2.id}", "multihop",
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
    facts = [Fact(f.subject, f.relation, f.object, f.id, split[f.subject], f.subject_type, f.object_type) for f in facts]

    # -- 3. rendering -------------------------------------------------------------------
    r = _Renderer("world", seed, lang, paraphrases, namer)
    id_of = {v: k for k, v in names.items()}
    groups: dict[str, list[Fact]] = {}
    for f in facts:
        groups.setdefault(id_of[f.subject], []).append(f)
    documents = r.documents(list(groups.items()))
    types = _entity_types(facts)
    probes = _standard_probes(r, facts, _pools(types))
    probes["locality"] = locality_probes(lang)
    return World("world", lang, seed, paraphrases, facts, documents, r.qa(facts), _ordered(probes),
                 types, r.decoys)


def _ordered(probes: Mapping[str, list[dict]]) -> list[dict]:
    """Probes grouped by kind in the canonical kind order (fixed file order)."""
    order = ("recall", "paraphrase", "reverse", "multihop", "qa", "locality")
    return [p for k in order for p in probes.get(k, [])]


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
    facts = [Fact(f.subject, f.relation, f.object, f.id, split[f.subject], f.subject_type, f.object_type) for f in facts]
    r = _Renderer("chain", seed, lang, paraphrases, namer)
    documents = r.documents([("chain", facts)])
    pos = {n: i for i, n in enumerate(nodes)}
    # Forward "A causes ?": every downstream event is arguably right (A causes it through
    # the chain), so wrong answers are upstream events (nearest first), then decoys.
    # Reverse "? causes B": every upstream event is arguably right; wrong answers downstream.
    probes = _standard_probes(
        r, facts, {"event": nodes},
        fwd_bad=lambda f, c: c in pos and pos[c] >= pos[f.subject],
        rev_bad=lambda f, c: c in pos and pos[c] <= pos[f.object],
        fwd_prefer=lambda f: nodes[max(0, pos[f.subject] - N_DISTRACTORS): pos[f.subject]][::-1],
        rev_prefer=lambda f: nodes[pos[f.object] + 1: pos[f.object] + 1 + N_DISTRACTORS])
    # transitive: two links ahead ("indirectly"); wrong answers: upstream events, decoys
    ind = {"en": "{s} indirectly causes {o}.", "ja": "{s}が間接的に引き起こすのは{o}です。"}[lang]
    for i in range(length - 1):
        s, o = nodes[i], nodes[i + 2]
        d = r.distractors([], "event", lambda c, i=i: c in pos and pos[c] >= i, nodes[max(0, i - N_DISTRACTORS): i][::-1])
        probes["multihop"].append(r.probe(f"{facts[i].id}+{facts[i + 1].id}-hop", f"{facts[i].id}+{facts[i + 1].id}",
                                          "multihop", prefix(ind, "o", s=s), o, d))
    yes, no = {"en": ("Yes", "No"), "ja": ("はい", "いいえ")}[lang]
    ask = {"en": "Does {s} cause {o}?", "ja": "{s}は{o}を引き起こしますか？"}[lang]
    for f in facts:
        probes["qa"].append(r.probe(f"{f.id}-contra", f.id, "qa", fill(ask, s=f.object, o=f.subject), no, [yes]))
        probes["qa"].append(r.probe(f"{f.id}-affirm", f.id, "qa", fill(ask, s=f.subject, o=f.object), yes, [no]))
    return World("chain", lang, seed, paraphrases, facts, documents, r.qa(facts), _ordered(probes),
                 _entity_types(facts), r.decoys)


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
    facts = [Fact(f.subject, f.relation, f.object, f.id, split[f.subject], f.subject_type, f.object_type) for f in facts]
    by_id = {f.id: f for f in facts}
    groups = [(gid, [by_id[f.id] for f in fs]) for gid, fs in groups]
    r = _Renderer("containment", seed, lang, paraphrases, namer)
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
    probes = _standard_probes(r, facts, _pools(types),
                              fwd_bad=lambda f, c: c == f.subject or c in ancestors(f.subject),
                              rev_bad=lambda f, c: c == f.object or f.object in ancestors(c))
    return World("containment", lang, seed, paraphrases, facts, documents, r.qa(facts), _ordered(probes),
                 types, r.decoys)


# --------------------------------------------------------------------------------------------
# Locality: facts a pretrained model already knows (should survive training)
# --------------------------------------------------------------------------------------------

LOCALITY: dict[str, list[tuple[str, str, list[str]]]] = {
    "en": [
        ("The capital of France is", "Paris", ["London", "Berlin", "Madrid"]),
        ("The capital of Japan is", "Tokyo", ["Beijing", "Seoul", "Bangkok"]),
        ("The capital of Italy is", "Rome", ["Milan", "Athens", "Vienna"]),
        ("The capital of Germany is", "Berlin", ["Munich", "Vienna", "Paris"]),
        ("The capital of the United Kingdom is", "London", ["Dublin", "Paris", "Edinburgh"]),
        ("The capital of Spain is", "Madrid", ["Lisbon", "Barcelona", "Rome"]),
        ("The capital of Russia is", "Moscow", ["Kyiv", "Warsaw", "Minsk"]),
        ("The capital of Egypt is", "Cairo", ["Nairobi", "Tunis", "Baghdad"]),
        ("The largest planet in the solar system is", "Jupiter", ["Mars", "Venus", "Mercury"]),
        ("The planet closest to the Sun is", "Mercury", ["Jupiter", "Saturn", "Neptune"]),
        ("Water is made of hydrogen and", "oxygen", ["nitrogen", "carbon", "helium"]),
        ("The chemical symbol for gold is", "Au", ["Ag", "Fe", "Cu"]),
        ("The Eiffel Tower is in", "Paris", ["Rome", "London", "Berlin"]),
        ("The Great Wall is in", "China", ["India", "Brazil", "Egypt"]),
        ("The play Hamlet was written by William", "Shakespeare", ["Wordsworth", "Blake", "Dickens"]),
        ("The first president of the United States was George", "Washington", ["Lincoln", "Jefferson", "Adams"]),
        ("The theory of relativity was developed by Albert", "Einstein", ["Newton", "Darwin", "Curie"]),
        ("The longest river in Africa is the", "Nile", ["Amazon", "Danube", "Thames"]),
        ("One week has seven", "days", ["hours", "months", "years"]),
        ("A year has twelve", "months", ["days", "weeks", "hours"]),
        ("The opposite of hot is", "cold", ["warm", "wet", "loud"]),
        ("On a clear day the sky is", "blue", ["green", "red", "yellow"]),
        ("Two plus two equals", "four", ["five", "three", "six"]),
        ("The Statue of Liberty is in New", "York", ["Jersey", "Orleans", "Delhi"]),
        ("Bees make", "honey", ["milk", "silk", "paper"]),
        ("The currency of Japan is the", "yen", ["euro", "dollar", "peso"]),
        ("The largest ocean on Earth is the", "Pacific", ["Atlantic", "Indian", "Arctic"]),
        ("Ice is frozen", "water", ["milk", "oil", "sand"]),
        ("The Mona Lisa was painted by Leonardo da", "Vinci", ["Silva", "Costa", "Ponte"]),
        ("The Sun rises in the", "east", ["west", "north", "south"]),
    ],
    "ja": [
        ("日本の首都は", "東京", ["大阪", "京都", "名古屋"]),
        ("フランスの首都は", "パリ", ["ロンドン", "ベルリン", "ローマ"]),
        ("イギリスの首都は", "ロンドン", ["パリ", "ベルリン", "マドリード"]),
        ("日本で一番高い山は", "富士山", ["高尾山", "阿蘇山", "浅間山"]),
        ("一週間は", "七日", ["五日", "十日", "三日"]),
        ("水は水素と", "酸素", ["窒素", "炭素", "ヘリウム"]),
        ("太陽系で最も大きい惑星は", "木星", ["火星", "金星", "水星"]),
        ("アメリカの首都は", "ワシントン", ["ニューヨーク", "シカゴ", "ボストン"]),
        ("日本の通貨は", "円", ["ドル", "ユーロ", "ウォン"]),
        ("『源氏物語』の作者は", "紫式部", ["清少納言", "夏目漱石", "芥川龍之介"]),
        ("太陽が昇る方角は", "東", ["西", "南", "北"]),
    ],
}


def locality_probes(lang: str = "en") -> list[dict]:
    """The built-in well-known facts as ``locality`` probes (about 30 English, 10 Japanese)."""
    check_lang(lang)
    return [{"id": f"loc-{lang}-{i:02d}", "fact": f"loc-{lang}-{i:02d}", "kind": "locality",
             "prompt": p, "target": t, "distractors": list(d)}
            for i, (p, t, d) in enumerate(LOCALITY[lang], 1)]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _jsonl(rows: Iterable[Mapping]) -> str:
    # sorted keys + ensure_ascii=False + "\n" at the end: same world, same bytes.
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))  # bytes: no platform newline translation
    return path


OUTPUT_NAMES = ("docs", "corpus.jsonl", "qa.jsonl", "probes.jsonl", "facts.jsonl", "world.json")


def write_world(world: World, out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write the world's files; returns ``{"corpus", "qa", "probes", "facts", "summary"}``.

    ``corpus`` is the ``docs/`` folder (one ``.txt`` per document) for small worlds and
    ``corpus.jsonl`` beyond :data:`DOCS_AS_FILES_MAX` documents; both load with
    ``factlab.data.corpus.load_documents``. A non-empty ``out_dir`` is refused unless
    ``overwrite``; then only factlab's own outputs are replaced.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FactlabError(f"{out} exists and is not a folder; choose another output folder")
    replacing = out.is_dir() and any(out.iterdir())
    if replacing and not overwrite:
        raise FactlabError(f"output folder {out} is not empty; choose a new folder or pass --force to overwrite")
    from factlab.atomic import staged_dir

    # Written into a temporary sibling and renamed when complete: an interrupted write leaves
    # no half-made world (which the next call would refuse to overwrite).
    with staged_dir(out) as tmp:
        paths: dict[str, Path] = {}
        if len(world.documents) <= DOCS_AS_FILES_MAX:
            docs_dir = tmp / "docs"
            docs_dir.mkdir(exist_ok=True)
            for d in world.documents:
                _write(docs_dir / f"{d['id']}.txt", d["text"] + "\n")
            paths["corpus"] = docs_dir
        else:
            paths["corpus"] = _write(tmp / "corpus.jsonl", _jsonl(world.documents))
        paths["qa"] = _write(tmp / "qa.jsonl", _jsonl(world.qa))
        paths["probes"] = _write(tmp / "probes.jsonl", _jsonl(world.probes))
        paths["facts"] = _write(tmp / "facts.jsonl", _jsonl(f.to_dict() for f in world.facts))
        summary = world.summary()
        summary["files"] = {k: p.relative_to(tmp).as_posix() + ("/" if p.is_dir() else "") for k, p in paths.items()}
        paths["summary"] = _write(tmp / "world.json", json.dumps(summary, ensure_ascii=False, sort_keys=True, indent=2) + "\n")
        if replacing:
            # Remove only what a previous write_world made, so stale documents cannot mix in.
            docs_old = out / "docs"
            if docs_old.is_dir():
                for p in docs_old.glob("*.txt"):
                    p.unlink()
            for name in OUTPUT_NAMES[1:]:
                (out / name).unlink(missing_ok=True)
    paths = {k: out / p.relative_to(tmp) for k, p in paths.items()}
    return paths
