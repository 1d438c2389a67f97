"""Probe sets: the questions asked of a model before and after every stage.

A probe file is JSONL, one probe per line (blank lines are skipped)::

    {"id": "f12-para", "fact": "f12", "kind": "paraphrase",
     "prompt": "Among the staff, the one who runs the press line is", "target": "Marta Ilvane",
     "distractors": ["Jonas Perl", "Edda Sorn"]}

Kinds: ``recall`` (trained phrasing), ``paraphrase``, ``reverse``, ``multihop``, ``locality``
(facts the base model already knew) and ``qa`` (a chat question; the prompt is wrapped in the
tokenizer's chat template before scoring). Every problem in a file is reported as one
``FactlabError`` line that names the file, the line and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from factlab.errors import FactlabError

ProbeKind = Literal["recall", "paraphrase", "reverse", "multihop", "locality", "qa"]
PROBE_KINDS: tuple[str, ...] = get_args(ProbeKind)


def order_kinds(kinds) -> list[str]:
    """The one probe-kind order (summaries, tables, reports): known kinds in PROBE_KINDS order,
    any others sorted after them, then "all" when it is among `kinds`."""
    kinds = set(kinds)
    rest = kinds - {"all"}
    return ([k for k in PROBE_KINDS if k in rest] + sorted(rest - set(PROBE_KINDS)) + (["all"] if "all" in kinds else []))


class Probe(BaseModel):
    """One probe: a prompt, the expected answer and optional wrong answers to rank against."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    """Unique within a probe set; rows in score tables are keyed by it."""
    fact: str | None = None
    """The fact this probe tests; probes of one fact in different kinds share it."""
    kind: ProbeKind
    prompt: str = Field(min_length=1)
    """Text the answer continues (for ``qa``: the user's question)."""
    target: str
    """The expected answer, without the separating space (scoring adds it)."""
    distractors: list[str] = []
    """Wrong answers; the probe is correct when the target beats all of them."""

    @field_validator("target")
    @classmethod
    def _target_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty target")
        return v

    @field_validator("distractors")
    @classmethod
    def _distractors_not_blank(cls, v: list[str]) -> list[str]:
        if any(not d.strip() for d in v):
            raise ValueError("empty distractor")
        return v


def _describe(error: dict, probe_id: str | None) -> str:
    """Turn the first pydantic error into '<what is wrong>; <how to fix it>'."""
    field = str(error["loc"][0]) if error["loc"] else ""
    who = f"probe {probe_id!r}" if probe_id else "probe"
    kind = error["type"]
    if kind == "missing":
        return f"{who} is missing the field {field!r}; add it"
    if kind == "extra_forbidden":
        allowed = ", ".join(Probe.model_fields)
        return f"{who} has an unknown field {field!r}; allowed fields are {allowed}"
    if field == "kind" and kind == "literal_error":
        return (f"{who} has an unknown kind {error['input']!r}; "
                f"use one of {', '.join(PROBE_KINDS)}")
    if field == "target" and kind in ("value_error", "string_too_short"):
        return f"{who} has an empty target; give the expected answer text"
    if field == "prompt" and kind == "string_too_short":
        return f"{who} has an empty prompt; give the text the answer continues"
    if field == "id" and kind == "string_too_short":
        return "probe has an empty id; give each probe a unique non-empty id"
    if field == "distractors" and kind == "value_error":
        return f"{who} has an empty distractor; remove it or give the wrong-answer text"
    # Type errors and anything else: pydantic's own wording is clear enough on one line.
    return f"{who}: field {field!r}: {error['msg']}; fix the value"


def load_probes(path: str | Path) -> list[Probe]:
    """Read a JSONL probe file; raise ``FactlabError`` naming file:line for any bad line."""
    path = Path(path)
    if not path.is_file():
        raise FactlabError(f"probe file not found: {path}; check the path")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: tolerate a BOM written by some editors
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise FactlabError(f"{path}:{line}: not valid UTF-8 text; save the file as UTF-8") from None

    if "\0" in text:
        raise FactlabError(f"{path}:{text[: text.index(chr(0))].count(chr(10)) + 1}: contains NUL bytes: it is binary, "
                           "not text; save the probes as UTF-8 JSONL")
    probes: list[Probe] = []
    first_line: dict[str, int] = {}  # probe id -> line it was first seen on
    # split("\n") rather than splitlines(): JSON strings may hold U+2028 etc. unescaped.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FactlabError(
                f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                "write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise FactlabError(f"{path}:{lineno}: expected a JSON object, got "
                               f"{type(obj).__name__}; write one probe object per line")
        try:
            probe = Probe.model_validate(obj)
        except ValidationError as e:
            pid = obj.get("id") if isinstance(obj.get("id"), str) and obj.get("id") else None
            # A misspelt key shows up twice (unknown `targt` + missing `target`): name the typo.
            first = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
            raise FactlabError(f"{path}:{lineno}: {_describe(first, pid)}") from None
        if probe.id in first_line:
            raise FactlabError(
                f"{path}:{lineno}: duplicate probe id {probe.id!r} (first on line "
                f"{first_line[probe.id]}); give each probe a unique id")
        first_line[probe.id] = lineno
        probes.append(probe)
    if not probes:
        raise FactlabError(f"{path}: no probes in the file; add one JSON probe object per line")
    return probes
