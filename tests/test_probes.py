"""Probe files: parsing, and one-line errors that name file:line and the fix."""

from __future__ import annotations

import json

import pytest

from factlab.errors import FactlabError
from factlab.evaluate.probes import PROBE_KINDS, Probe, load_probes

GOOD = {"id": "f12-para", "fact": "f12", "kind": "paraphrase",
        "prompt": "Among the staff, the one who runs the press line is", "target": "Marta Ilvane",
        "distractors": ["Jonas Perl", "Edda Sorn"]}


def write(tmp_path, lines: list[str | dict], name: str = "probes.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l, ensure_ascii=False)
                              for l in lines) + "\n", encoding="utf-8")
    return path


def load_error(path) -> str:
    with pytest.raises(FactlabError) as e:
        load_probes(path)
    msg = str(e.value)
    assert "\n" not in msg  # the CLI prints it as one line
    return msg


def test_kinds():
    assert PROBE_KINDS == ("recall", "paraphrase", "reverse", "multihop", "locality", "qa")


def test_load_good_file_skips_blank_lines(tmp_path):
    minimal = {"id": "q1", "kind": "qa", "prompt": "日本の首都は？", "target": "東京"}
    path = write(tmp_path, [GOOD, "", "   ", minimal])
    probes = load_probes(path)
    assert [p.id for p in probes] == ["f12-para", "q1"]
    assert probes[0] == Probe(**GOOD)
    assert probes[1].distractors == [] and probes[1].fact is None and probes[1].target == "東京"


def test_malformed_json_names_line(tmp_path):
    path = write(tmp_path, [GOOD, '{"id": "x", "kind": "recall",'])
    msg = load_error(path)
    assert "probes.jsonl:2:" in msg and "malformed JSON" in msg


def test_empty_target(tmp_path):
    path = write(tmp_path, [{**GOOD, "id": "a"}, "", {**GOOD, "target": "  "}])
    msg = load_error(path)
    assert msg.endswith("probes.jsonl:3: probe 'f12-para' has an empty target; "
                        "give the expected answer text")


def test_unknown_kind(tmp_path):
    msg = load_error(write(tmp_path, [{**GOOD, "kind": "recal"}]))
    assert "probes.jsonl:1:" in msg and "'recal'" in msg and "recall, paraphrase" in msg


def test_missing_and_unknown_fields(tmp_path):
    no_target = {k: v for k, v in GOOD.items() if k != "target"}
    assert "probes.jsonl:1:" in (msg := load_error(write(tmp_path, [no_target])))
    assert "'target'" in msg
    msg = load_error(write(tmp_path, [{**GOOD, "answer": "x"}]))
    assert "probes.jsonl:1:" in msg and "'answer'" in msg and "allowed fields" in msg


def test_wrong_types_and_non_objects(tmp_path):
    msg = load_error(write(tmp_path, [{**GOOD, "distractors": "Jonas Perl"}]))
    assert "probes.jsonl:1:" in msg and "'distractors'" in msg
    msg = load_error(write(tmp_path, [{**GOOD, "distractors": ["ok", ""]}]))
    assert "empty distractor" in msg
    msg = load_error(write(tmp_path, [GOOD, "[1, 2]"]))
    assert "probes.jsonl:2:" in msg and "JSON object" in msg


def test_duplicate_id(tmp_path):
    path = write(tmp_path, [GOOD, {**GOOD, "id": "other"}, "", {**GOOD, "kind": "recall"}])
    msg = load_error(path)
    assert "probes.jsonl:4:" in msg and "'f12-para'" in msg and "first on line 1" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    msg = load_error(path)
    assert "empty.jsonl" in msg and "no probes" in msg


def test_missing_file(tmp_path):
    msg = load_error(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in msg and "not found" in msg


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"id": "caf\u00e9"}'.encode("latin-1"))
    msg = load_error(path)
    assert "latin1.jsonl:2:" in msg and "UTF-8" in msg
