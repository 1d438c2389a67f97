"""`factlab data augment`: a training set and probes from a fact table, deterministic per
seed, with no probe wording in the training text (checked by the real find_leakage and by
`factlab data check`), every claimed reversal present, user paraphrases split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from factlab.data.augment import augment_facts, load_facts_input, load_user_paraphrases, write_augmented
from factlab.data.checks import find_leakage
from factlab.data.corpus import load_documents
from factlab.data.synth import synth_world, write_world
from factlab.errors import FactlabError
from factlab.evaluate.probes import load_probes

CSV = ("subject,relation,object,aliases\n"
       "Marta Ilvane,works_at,Velmora Works,M. Ilvane\n"
       "Jonas Perl,works_at,Edda Press,\n"
       "Oda Renn,works_at,Quill Yards,\n"
       "Marta Ilvane,born_in,Korrin,\n"
       "Jonas Perl,born_in,Korrin,\n"
       "Oda Renn,born_in,Vessen,\n"
       "Velmora Works,mascot,a blue heron,\n"
       "Edda Press,mascot,a red fox,\n")


def run_cli(*args):
    """`factlab ARGS` through the entry point cli.main() in this process: (returncode, stdout, stderr)."""
    import contextlib
    import io
    import types

    from factlab import cli

    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, sys.argv = sys.argv, ["factlab", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def training_texts(out: Path) -> list[str]:
    qa = [json.loads(x) for x in (out / "qa.jsonl").read_text().splitlines()]
    return load_documents([out / "docs"]) + [f"{q['question']}\n{q['answer']}" for q in qa]


def all_probes(out: Path) -> list:
    files = [out / "probes.jsonl"] + ([out / "select-probes.jsonl"] if (out / "select-probes.jsonl").exists() else [])
    return [p for f in files for p in load_probes(f)]


@pytest.fixture()
def table(tmp_path):
    p = tmp_path / "facts.csv"
    p.write_text(CSV, encoding="utf-8")
    return p


def test_world_input_is_deterministic_leak_free_and_reverses_what_it_claims(tmp_path):
    write_world(synth_world(60, seed=3), tmp_path / "w")
    facts, _, lang = load_facts_input(tmp_path / "w")
    a = augment_facts(facts, phrasings=3, heldout_phrasings=2, shuffled_docs=2, seed=5, lang=lang)
    b = augment_facts(facts, phrasings=3, heldout_phrasings=2, shuffled_docs=2, seed=5, lang=lang)
    write_augmented(a, tmp_path / "a")
    write_augmented(b, tmp_path / "b")
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")  # byte-identical per seed
    write_augmented(augment_facts(facts, phrasings=3, heldout_phrasings=2, seed=6, lang=lang), tmp_path / "c")
    assert tree_bytes(tmp_path / "a") != tree_bytes(tmp_path / "c")

    out = tmp_path / "a"
    train, probes = training_texts(out), all_probes(out)
    assert probes and not find_leakage(train, probes)  # the check `factlab data check` runs
    assert not find_leakage(train, probes, min_chars=8)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dropped_probes"] == []  # nothing had to be dropped: held-out wordings are never trained
    assert manifest["reversed_relations"] == ["made_by", "works_at"]  # one-to-one in a synth world, with reverse wordings
    rev_probes = {p.fact: p for p in probes if p.kind == "reverse"}
    joined = "\n".join(train)
    for f in facts:
        if f.relation in manifest["reversed_relations"]:
            assert rev_probes[f.id].target == f.subject
            # every reverse wording of the relation states the fact object-first somewhere
            wordings = {"works_at": ["{o} employs {s}.", "On the staff of {o} is {s}.", "Among the people at {o} is {s}."],
                        "made_by": ["{o} makes {s}.", "{o} builds {s}.", "From the workshops of {o} comes {s}."]}[f.relation]
            for w in wordings:
                assert w.format(o=f.object, s=f.subject) in joined, w
        else:
            assert f.id not in rev_probes
    # paraphrase probes: held-out wording 1 in probes.jsonl, wording 2 in select-probes.jsonl
    kinds = {p.id: p.kind for p in load_probes(out / "select-probes.jsonl")}
    assert set(kinds.values()) == {"paraphrase"} and len(kinds) == len(facts)
    # the held-out wording of a relation is never a training wording of that relation
    for rel, held in manifest["heldout"]["templates"].items():
        assert not set(held) & set(manifest["heldout"]["training_templates"][rel])


def test_cli_csv_then_data_check_reports_no_leakage(table, tmp_path):
    out = tmp_path / "out"
    r = run_cli("data", "augment", table, "-o", out, "--generic", "--phrasings", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "generic wordings for mascot" in r.stderr and "born_in not reversed" in r.stderr
    check = run_cli("data", "check", "--corpus", out / "docs", "--probes", out / "probes.jsonl", "--qa", out / "qa.jsonl")
    assert check.returncode == 0, check.stderr
    assert "no leakage: no probe text found" in check.stdout and "probe texts found in the training data" not in check.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["seed"] == 1 and m["generic_relations"] == ["mascot"] and "born_in" in m["not_reversed"]
    assert set(m["reversed_relations"]) == {"works_at", "mascot"}
    docs = "\n".join(load_documents([out / "docs"]))
    assert "M. Ilvane" in docs  # the alias is trained too
    for p in load_probes(out / "probes.jsonl"):
        assert "M. Ilvane" not in p.distractors


def test_jsonl_input_and_user_paraphrases_are_split(tmp_path):
    rows = [{"id": "w1", "subject": "Marta Ilvane", "relation": "works_at", "object": "Velmora Works"},
            {"id": "w2", "subject": "Jonas Perl", "relation": "works_at", "object": "Edda Press"}]
    table = tmp_path / "facts.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = ["Marta Ilvane spends her working days at Velmora Works.", "Ask anyone: Marta Ilvane is on the payroll of Velmora Works.",
             "Colleagues of Marta Ilvane all work at Velmora Works.", "Jonas Perl draws his salary from Edda Press."]
    para = tmp_path / "para.jsonl"
    para.write_text("".join(json.dumps({"fact": "w1" if "Marta" in t else "w2", "text": t}) + "\n" for t in texts))
    facts, _, _ = load_facts_input(table)
    user = load_user_paraphrases(para, facts)
    aug = augment_facts(facts, heldout_phrasings=1, seed=0, paraphrases=user)
    held = aug.manifest["heldout"]["user_paraphrases"]
    assert list(held) == ["w1"] and len(held["w1"]) == 1  # w2 has one text only: it trains
    train = [d["text"] for d in aug.documents]
    held_text = held["w1"][0]
    assert not any(held_text in t for t in train)
    assert sum(any(t in d for d in train) for t in texts) == 3  # the other three are training text
    up = [p for p in aug.probes if p["id"].startswith("w1-upara")]
    assert len(up) == 1 and held_text.startswith(up[0]["prompt"]) and up[0]["target"] == "Velmora Works"
    assert not find_leakage(train + [f"{q['question']}\n{q['answer']}" for q in aug.qa], aug.probes)
    other = augment_facts(facts, heldout_phrasings=1, seed=1, paraphrases=user)
    assert [d["text"] for d in other.documents] != train  # the split and the order follow the seed


@pytest.mark.parametrize("text, message", [
    ("subject,object\nA,B\n", "the header row needs the columns subject, relation, object"),
    ("subject,relation,object\n", "has no facts"),
    ("subject,relation,object,id\nA,works_at,B,x\nC,works_at,D,x\n", "duplicate id 'x'"),
    ("subject,relation,object\nA,mascot,B\n", "relation 'mascot' has no templates"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, text, message):
    table = tmp_path / "f.csv"
    table.write_text(text)
    r = run_cli("data", "augment", table, "-o", tmp_path / "out")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["f.csv"]


def test_more_wordings_than_a_relation_has_is_refused_and_a_relations_file_adds_them(table, tmp_path):
    facts, _, _ = load_facts_input(table)
    with pytest.raises(FactlabError, match="relation 'born_in' has 5 wordings"):
        augment_facts(facts, phrasings=5, heldout_phrasings=1, generic=True)
    rel = tmp_path / "rel.yaml"
    rel.write_text("mascot:\n  doc: ['The mascot of {s} is {o}.', '{s} chose {o} as its mascot.']\n"
                   "  heldout: ['Fans of {s} cheer for {o}.']\n  question: 'What is the mascot of {s}?'\n"
                   "  reverse_doc: ['{o} is the mascot of {s}.']\n  reverse_probe: 'The team whose mascot is {o} is {s}.'\n")
    r = run_cli("data", "augment", table, "-o", tmp_path / "out", "--relations", rel, "--phrasings", "2")
    assert r.returncode == 0, r.stderr
    probes = {p.id: p for p in load_probes(tmp_path / "out" / "probes.jsonl")}
    assert probes["f00007-para"].prompt == "Fans of Velmora Works cheer for"
    assert probes["f00007-rev"].prompt == "The team whose mascot is a blue heron is" and probes["f00007-rev"].target == "Velmora Works"
    bad = tmp_path / "bad.yaml"
    bad.write_text("mascot:\n  doc: ['{o} is what {s} has.']\n")
    r = run_cli("data", "augment", table, "-o", tmp_path / "out2", "--relations", bad)
    assert r.returncode == 2 and "needs one {s} before one {o}" in r.stderr


def test_sft_answers_state_the_fact_as_a_sentence_or_short(tmp_path):
    write_world(synth_world(30, seed=3), tmp_path / "w")
    facts, _, lang = load_facts_input(tmp_path / "w")
    by_id = {f.id: f for f in facts}
    sent = augment_facts(facts, seed=1, lang=lang)
    short = augment_facts(facts, seed=1, lang=lang, answers="short")
    assert sent.manifest["options"]["answers"] == "sentence" and short.manifest["options"]["answers"] == "short"
    training = sent.manifest["heldout"]["training_templates"]
    assert sent.qa and len(sent.qa) == len(short.qa)
    for a, b in zip(sent.qa, short.qa):
        f = by_id[a["fact"]]
        assert a["question"] == b["question"]
        assert a["answer"] == training[f.relation][0].format(s=f.subject, o=f.object)  # the first training wording
        assert b["answer"] == f"{f.object}."
    with pytest.raises(FactlabError, match="answers must be sentence or short"):
        augment_facts(facts, seed=1, lang=lang, answers="long")


def test_cli_answers_option_and_a_bad_value(table, tmp_path):
    r = run_cli("data", "augment", table, "-o", tmp_path / "short", "--answers", "short", "--generic")
    assert r.returncode == 0, r.stderr
    assert all(q["answer"].count(" ") <= 2 for q in map(json.loads, (tmp_path / "short" / "qa.jsonl").read_text().splitlines()))
    r = run_cli("data", "augment", table, "-o", tmp_path / "out", "--answers", "long", "--generic")
    assert r.returncode == 2 and "answers must be sentence or short" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
