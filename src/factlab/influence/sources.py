"""Sample sets from the user's files, and the structure columns of synth worlds.

Every loader checks what would make the matrix meaningless before a model is loaded: a sample
with nothing to score, duplicate ids, fewer than two samples, a missing file.

Synth worlds (``factlab data synth``, see data/synth.py): the world's completion probes of the
chosen kinds become samples (id = probe id, group = fact id, meta = kind, relation, subject,
object); ``qa`` probes become chat samples. For ``--kind chain`` and ``--kind containment`` the
facts (``facts.jsonl``) give extra *structure columns*, statements the world never trains on:

- chain (events e0 → e1 → … → eL): for every pair u < v two or more links apart, the forward
  statement "e_u causes e_v" (id ``chain:u>v``) and the backward one "e_v causes e_u"
  (``chain:v>u``), worded with the relation's first document template;
- containment (fact f: "A is in B"): "B contains A" (``f:contains``, true), "B is in A"
  (``f:is_in-swapped``, false), both scoring A; and the token-order variants scoring B:
  "A is in B" (``f:is_in``, true) and "A contains B" (``f:contains-swapped``, false).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factlab.config import InfluenceSamples
from factlab.data.io import iter_jsonl
from factlab.errors import FactlabError
from factlab.influence.samples import Sample


@dataclass
class SampleSet:
    """The samples, the kind of world they came from, and its structure columns."""

    samples: list[Sample]
    kind: str = "samples"
    """``corpus``, ``qa``, ``pairs`` or the world kind (``world``, ``chain``, ``containment``)."""
    structure: list[Sample] = field(default_factory=list)
    facts: list[dict] = field(default_factory=list)
    lang: str = "en"


def _check_target(sample_id: str, target: str, where: str) -> None:
    if not target.strip():
        raise FactlabError(f"{where}: sample {sample_id!r} has nothing to score (empty target); "
                           "give it a non-empty target/answer/text or remove it")


def _corpus(paths: list[str]) -> list[Sample]:
    from factlab.data.corpus import read_documents

    out = []
    for p in map(Path, paths):
        if p.suffix == ".jsonl" and p.is_file():
            for lineno, obj in iter_jsonl(p, "influence corpus"):
                text = obj.get("text")
                if not isinstance(text, str):
                    raise FactlabError(f"{p}:{lineno}: corpus lines need a string field \"text\"")
                sid = str(obj.get("id") or f"{p.stem}:{lineno}")
                _check_target(sid, text, f"{p}:{lineno}")
                out.append(Sample(sid, "", text.strip(), group=obj.get("group")))
            continue
        for label, text in read_documents([p]):
            sid = Path(label).stem
            _check_target(sid, text, label)
            out.append(Sample(sid, "", text.strip()))
    return out


def _qa(path: str) -> list[Sample]:
    out = []
    for lineno, obj in iter_jsonl(Path(path), "influence Q&A file"):
        if "question" not in obj or "answer" not in obj:
            raise FactlabError(f"{path}:{lineno}: a Q&A line needs \"question\" and \"answer\"")
        sid = str(obj.get("id") or f"qa{lineno}")
        _check_target(sid, str(obj["answer"]), f"{path}:{lineno}")
        group = obj.get("group", obj.get("fact"))
        out.append(Sample(sid, str(obj["question"]), str(obj["answer"]), group=group, meta={"chat": True}))
    return out


def joined_target(prompt: str, target: str) -> str:
    """The target as the scored continuation, by the probes' rule (``candidate_continuation``):
    a space before it unless the prompt is empty or ends with whitespace, the target starts
    with whitespace, or the prompt ends in a script written without spaces (CJK, kana)."""
    from factlab.evaluate.facts import candidate_continuation
    from factlab.evaluate.probes import Probe

    if not prompt:
        return target
    return candidate_continuation(Probe(id="x", kind="recall", prompt=prompt, target=target), target)


def _pairs(path: str) -> list[Sample]:
    out = []
    for lineno, obj in iter_jsonl(Path(path), "influence pairs file"):
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("target"), str):
            raise FactlabError(f"{path}:{lineno}: a pairs line needs string fields \"prompt\" and \"target\"")
        sid = str(obj.get("id") or f"s{lineno}")
        _check_target(sid, obj["target"], f"{path}:{lineno}")
        meta = {k: v for k, v in obj.items() if k not in ("id", "prompt", "target", "group")}
        out.append(Sample(sid, obj["prompt"], joined_target(obj["prompt"], obj["target"]), group=obj.get("group"), meta=meta))
    return out


def probe_sample(probe, meta: dict | None = None) -> Sample:
    """A probe as a Sample: the prompt, and the target as the scorer's continuation (its word
    boundary included, see ``candidate_continuation``); ``qa`` probes become chat samples."""
    from factlab.evaluate.facts import candidate_continuation

    chat = probe.kind == "qa"
    return Sample(probe.id, probe.prompt, candidate_continuation(probe, probe.target),
                  group=probe.fact or None, meta={"kind": probe.kind, **({"chat": True} if chat else {}), **(meta or {})})


def probe_columns(paths: list[str]) -> list[Sample]:
    """Probe files as column samples (a missing file is a FactlabError naming it)."""
    from factlab.evaluate.probes import load_probes

    return [probe_sample(p) for path in paths for p in load_probes(path)]


def _statement(relation: str, lang: str, s: str, o: str, pid: str, fact: str, **meta) -> Sample:
    from factlab.data.templates import prefix, relation_templates
    from factlab.evaluate.probes import Probe

    template = relation_templates(relation, lang).doc[0]
    probe = Probe(id=pid, kind="recall", prompt=prefix(template, "o", s=s).rstrip(), target=o, fact=fact)
    return probe_sample(probe, {"structure": True, **meta})


class WorldSummary(BaseModel):
    """What the influence study reads from a synth world's ``world.json`` (data/synth.py writes
    more: counts and notes, which are ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    kind: Literal["world", "chain", "containment"] = "world"
    lang: str = "en"


class WorldFact(BaseModel):
    """One line of a synth world's ``facts.jsonl`` (data.synth.Fact), as the structure columns read it."""

    model_config = ConfigDict(extra="ignore", strict=True)
    id: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    relation: str = Field(min_length=1)
    object: str = Field(min_length=1)


def _read_world(root: Path) -> tuple[WorldSummary, list[WorldFact]]:
    """world.json and facts.jsonl of a synth world, each checked against its schema: a file
    that is not JSON, a summary of an unknown kind, no facts, or a fact without its subject is
    one FactlabError naming the file (before any model is loaded)."""
    from factlab.config import format_validation_error
    from factlab.data.io import read_text

    path = root / "world.json"
    again = f"write the world again with `factlab data synth -o {root}`"
    try:
        raw = json.loads(read_text(path, "world summary"))
    except json.JSONDecodeError as e:
        raise FactlabError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); {again}") from None
    if not isinstance(raw, dict):
        raise FactlabError(f"{path} must be a JSON object (kind, lang, counts), got {type(raw).__name__}; {again}")
    try:
        summary = WorldSummary.model_validate(raw)
    except ValidationError as e:
        raise FactlabError(f"{format_validation_error(e, str(path))}; {again}") from None
    facts, facts_path = [], root / "facts.jsonl"
    for lineno, obj in iter_jsonl(facts_path, "world facts file"):
        try:
            facts.append(WorldFact.model_validate(obj))
        except ValidationError as e:
            raise FactlabError(f"{format_validation_error(e, f'{facts_path}:{lineno}')}; {again}") from None
    if not facts:
        raise FactlabError(f"{facts_path} has no facts; {again}")
    return summary, facts


def _world(folder: str, kinds: list[str]) -> SampleSet:
    from factlab.evaluate.probes import load_probes

    root = Path(folder)
    summary_path = root / "world.json"
    if not summary_path.is_file():
        raise FactlabError(f"{root} is not a synth world (no world.json); write one with `factlab data synth -o {root}`")
    summary, facts = _read_world(root)
    kind, lang = summary.kind, summary.lang
    facts = [f.model_dump() for f in facts]
    by_id = {f["id"]: f for f in facts}
    samples = []
    for p in load_probes(root / "probes.jsonl"):
        if p.kind not in kinds:
            continue
        first = by_id.get((p.fact or "").split("+")[0], {})
        samples.append(probe_sample(p, {"relation": first.get("relation"), "subject": first.get("subject"),
                                        "object": first.get("object")}))
    structure: list[Sample] = []
    if kind == "chain":
        nodes = [facts[0]["subject"]] + [f["object"] for f in facts]
        for u in range(len(nodes)):
            for v in range(u + 2, len(nodes)):
                path = [facts[k]["id"] for k in range(u, v)]
                structure.append(_statement("causes", lang, nodes[u], nodes[v], f"chain:{u}>{v}", None,
                                            direction="forward", path=path, u=u, v=v))
                structure.append(_statement("causes", lang, nodes[v], nodes[u], f"chain:{v}>{u}", None,
                                            direction="backward", path=path, u=u, v=v))
    elif kind == "containment":
        from factlab.data.templates import relation_templates

        rev = relation_templates("is_in", lang).reverse_probe  # "{o} contains {s}."
        from factlab.data.templates import prefix
        from factlab.evaluate.probes import Probe

        def contains(container: str, member: str, pid: str, fid: str, **meta) -> Sample:
            prompt = prefix(rev, "s", o=container).rstrip()
            return probe_sample(Probe(id=pid, kind="reverse", prompt=prompt, target=member, fact=fid),
                                {"structure": True, **meta})

        for f in facts:
            a, b, fid = f["subject"], f["object"], f["id"]
            structure += [
                contains(b, a, f"{fid}:contains", fid, scores="A", truth=True),
                _statement("is_in", lang, b, a, f"{fid}:is_in-swapped", fid, scores="A", truth=False),
                _statement("is_in", lang, a, b, f"{fid}:is_in", fid, scores="B", truth=True),
                contains(a, b, f"{fid}:contains-swapped", fid, scores="B", truth=False),
            ]
    return SampleSet(samples, kind, structure, facts, lang)


def load_sample_set(spec: InfluenceSamples) -> SampleSet:
    """The samples of ``influence.samples`` (one source), checked."""
    if spec.world:
        out = _world(spec.world, spec.kinds)
    elif spec.corpus:
        out = SampleSet(_corpus(spec.corpus), "corpus")
    elif spec.qa:
        out = SampleSet(_qa(spec.qa), "qa")
    else:
        out = SampleSet(_pairs(spec.pairs), "pairs")
    if len(out.samples) < 2:
        raise FactlabError(f"influence needs at least 2 samples, the sample set has {len(out.samples)}; "
                           "add samples (or more world probe kinds in influence.samples.kinds)")
    seen: set[str] = set()
    for s in out.samples + out.structure:
        if s.id in seen:
            raise FactlabError(f"duplicate sample id {s.id!r} in the influence sample set; give each sample a unique id")
        seen.add(s.id)
    return out


def select_rows(samples: list[Sample], train: str | int | list[str]) -> list[Sample]:
    """The samples trained on: ``all``, the first N, or ids and ``kind:NAME`` selectors."""
    if train == "all":
        return list(samples)
    if isinstance(train, int):
        return list(samples[:train])
    by_id = {s.id: s for s in samples}
    out: list[Sample] = []
    for item in train:
        if item.startswith("kind:"):
            picked = [s for s in samples if s.meta.get("kind") == item[5:]]
            if not picked:
                raise FactlabError(f"influence.train: no sample of kind {item[5:]!r}; "
                                   "use a kind listed in influence.samples.kinds")
        elif item in by_id:
            picked = [by_id[item]]
        else:
            raise FactlabError(f"influence.train: no sample with id {item!r}; use ids from the sample set")
        out += [s for s in picked if s not in out]
    return out
