"""The wordings: how each relation is stated in training text, asked in held-out probes and
questions, in English and Japanese, plus the vocabularies and well-known facts worlds use.

Templates are data: :data:`RELATIONS` maps a language and a relation name to its
:class:`RelationTemplates`; :func:`register_relation` adds one, :func:`load_relations_file`
reads a user's. :func:`relation_wordings` picks a relation's wordings (the user's, the
registry's or the generic ones) for ``factlab data augment`` and distillation. Rendering
facts with them is ``factlab.data.render``'s job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import yaml

from factlab.data.io import read_text
from factlab.errors import FactlabError

LANGS = ("en", "ja")


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
    """Wordings used in training documents."""
    heldout: tuple[str, ...]
    """Wordings for ``paraphrase`` probes; never used in any document."""
    question: str
    """The Q&A / ``qa`` probe question."""
    answer: str = "{o}."
    """The Q&A answer; starts with the object so a ``qa`` probe's target is its prefix."""
    reverse_doc: tuple[str, ...] = ()
    """Object-first statements (``factlab data augment`` trains them for one-to-one relations)."""
    reverse_probe: str | None = None
    """Held-out object -> subject wording; only for relations that are one-to-one."""

    def problem(self) -> str | None:
        """What is wrong with these wordings (None: nothing): ``doc`` and ``heldout`` need one
        ``{s}`` before one ``{o}``, ``reverse_doc`` and ``reverse_probe`` one ``{o}`` before one ``{s}``."""
        for t in (*self.doc, *self.heldout):
            if t.count("{o}") != 1 or t.count("{s}") != 1 or t.index("{s}") > t.index("{o}"):
                return f"template {t!r} needs one {{s}} before one {{o}}"
        for t in (*self.reverse_doc, *([self.reverse_probe] if self.reverse_probe else [])):
            if t.count("{o}") != 1 or t.count("{s}") != 1 or t.index("{o}") > t.index("{s}"):
                return f"reverse template {t!r} needs one {{o}} before one {{s}}"
        return None


RELATIONS: dict[str, dict[str, RelationTemplates]] = {lang: {} for lang in LANGS}


def register_relation(lang: str, spec: RelationTemplates) -> None:
    """Add (or replace) the templates of one relation in one language."""
    problem = spec.problem()
    if problem:
        raise ValueError(f"relation {spec.name}: {problem}")
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

ALIAS: dict[str, str] = {"en": "{s} is also known as {o}.", "ja": "{s}は{o}とも呼ばれる。"}
"""A subject's other name (``factlab data augment``'s aliases column), stated once."""

# Causal chains (``synth_chain``): the transitive wording and the yes/no question.
CHAIN_INDIRECT: dict[str, str] = {"en": "{s} indirectly causes {o}.", "ja": "{s}が間接的に引き起こすのは{o}です。"}
CHAIN_ASK: dict[str, str] = {"en": "Does {s} cause {o}?", "ja": "{s}は{o}を引き起こしますか？"}
YES_NO: dict[str, tuple[str, str]] = {"en": ("Yes", "No"), "ja": ("はい", "いいえ")}

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
        problem = t.problem()
        if problem:
            raise FactlabError(f"{where}: {problem}")
        out[str(name)] = t
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


# Well-known real facts (``locality`` probes): a pretrained model already knows them, and
# should still know them after training.
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
