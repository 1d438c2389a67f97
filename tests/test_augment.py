"""Augmentation on a user's fact table: reading it (file:line errors), paraphrased documents,
sentence shuffling, reverse statements for one-to-one relations, Q&A-ification."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from factlab.data.augment import (
    load_fact_table,
    paraphrase_documents,
    qa_from_facts,
    reverse_statements,
    shuffle_sentences,
    split_sentences,
)
from factlab.data.render import Fact
from factlab.data.sft import load_conversations
from factlab.data.synth import synth_world, write_world
from factlab.errors import FactlabError

FACTS = [
    Fact("Marta Ilvane", "works_at", "Velmora Works", "f1"),
    Fact("Marta Ilvane", "born_in", "Korrin", "f2"),
    Fact("Jonas Perl", "works_at", "Edda Press", "f3"),
    Fact("Jonas Perl", "born_in", "Korrin", "f4"),
    Fact("Velmora Works", "mascot", "a blue heron", "f5"),
]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_load_csv_with_bom_extra_columns_and_quoted_commas(tmp_path):
    p = write(tmp_path, "facts.csv", "\ufeffSubject,relation,object,note\n"
                                     "Marta Ilvane,works_at,\"Velmora Works, Ltd.\",x\n\n"
                                     "Jonas Perl,born_in,Korrin,\n")
    facts = load_fact_table(p)
    assert [(f.subject, f.relation, f.object) for f in facts] == [
        ("Marta Ilvane", "works_at", "Velmora Works, Ltd."), ("Jonas Perl", "born_in", "Korrin")]
    assert [f.id for f in facts] == ["f00001", "f00002"]


def test_load_tsv_and_jsonl_and_synth_facts_round_trip(tmp_path):
    tsv = write(tmp_path, "f.tsv", "subject\trelation\tobject\tid\nA\tr\tB\tmy-id\n")
    assert load_fact_table(tsv) == [Fact("A", "r", "B", "my-id")]
    jl = write(tmp_path, "f.jsonl", json.dumps({"subject": "Org", "relation": "founded_in", "object": 1873}) + "\n")
    assert load_fact_table(jl)[0].object == "1873"  # numbers (years) are read as text
    world = synth_world(20, seed=0)
    paths = write_world(world, tmp_path / "w")
    assert load_fact_table(paths["facts"]) == world.facts


@pytest.mark.parametrize("name, text, message", [
    ("a.csv", "subject,object\nA,B\n", "a.csv:1: the header row needs the columns subject, relation, object"),
    ("a.csv", "subject,relation,object\nA,r,B\nC,r,\n", "a.csv:3: empty 'object'"),
    ("a.csv", "subject,relation,object\nA,r,B,extra\n", "a.csv:2: more cells than header columns"),
    ("a.csv", "subject,relation,object\nA,r\n", "a.csv:2: too few cells"),
    ("a.csv", "subject,relation,object,id\nA,r,B,x\nC,r,D,x\n", "a.csv:3: duplicate id 'x'"),
    ("a.csv", "subject,relation,object\n", "has no facts"),
    ("a.jsonl", '{"subject": "A", "relation": "r", "object": "B"}\n{"subject": "A"\n', "a.jsonl:2: malformed JSON"),
    ("a.jsonl", '{"subject": "A", "relation": "r"}\n', "a.jsonl:1: missing 'object'"),
    ("a.jsonl", '{"subject": "A", "relation": "r", "object": ["B"]}\n', "a.jsonl:1: 'object' must be text"),
    ("a.xlsx", "x", "unsupported file type '.xlsx'"),
])
def test_malformed_tables_name_file_and_line(tmp_path, name, text, message):
    p = write(tmp_path, name, text)
    with pytest.raises(FactlabError) as e:
        load_fact_table(p)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_table_is_a_clear_error(tmp_path):
    with pytest.raises(FactlabError, match="does not exist"):
        load_fact_table(tmp_path / "nope.csv")


def test_paraphrase_documents_k_wordings_per_subject():
    docs = paraphrase_documents(FACTS, k=3, seed=0)
    assert len(docs) == 3 * 3  # three subjects, three documents each
    assert len(set(docs)) == len(docs)
    for d in docs[:3]:  # the first subject's (Marta's) documents: both facts, once each
        assert d.count("Velmora Works") == 1 and d.count("Korrin") == 1
    wordings = {s for d in docs[:3] for s in split_sentences(d) if "Velmora" in s}
    assert len(wordings) == 3  # a different wording of works_at in each document
    # unknown relation: the generic template
    assert any("The mascot of Velmora Works is a blue heron." in d for d in docs)
    assert paraphrase_documents(FACTS, k=3, seed=0) == docs
    assert paraphrase_documents(FACTS, k=3, seed=1) != docs


def test_paraphrase_documents_japanese_and_bad_k():
    docs = paraphrase_documents([Fact("マルタ", "born_in", "コリン", "f1")], k=2, lang="ja")
    assert len(docs) == 2 and all("コリン" in d for d in docs) and docs[0] != docs[1]
    with pytest.raises(FactlabError, match="positive integer"):
        paraphrase_documents(FACTS, k=0)


def test_shuffle_sentences_keeps_sentences_and_is_seeded():
    doc = "A works at B. C was born in D! Is E in F? G makes H.\nI is J."
    out = shuffle_sentences(doc, seed=3)
    assert Counter(split_sentences(out)) == Counter(split_sentences(doc)) and len(split_sentences(doc)) == 5
    assert out == shuffle_sentences(doc, seed=3)
    assert {shuffle_sentences(doc, seed=s) for s in range(6)} != {out}
    ja = shuffle_sentences("マルタの出身地はコリンです。マルタの勤務先はヴェルモラです。", seed=1)
    assert " " not in ja and Counter(split_sentences(ja)) == Counter(["マルタの出身地はコリンです。", "マルタの勤務先はヴェルモラです。"])


def test_reverse_statements_only_for_one_to_one_relations():
    out = reverse_statements(FACTS)
    # works_at is one-to-one here; born_in is not (two people from Korrin)
    assert "Velmora Works employs Marta Ilvane." in out and "Edda Press employs Jonas Perl." in out
    assert not any("Korrin" in s for s in out)
    assert "a blue heron is the mascot of Velmora Works." in out  # generic reverse wording
    everything = reverse_statements(FACTS, only_invertible=False)
    assert "Korrin is the birthplace of Marta Ilvane." in everything


def test_qa_from_facts_is_valid_sft_data(tmp_path):
    qa = qa_from_facts(FACTS)
    assert qa[0] == {"question": "Where does Marta Ilvane work?", "answer": "Velmora Works.", "fact": "f1"}
    assert qa[-1]["question"] == "What is the mascot of Velmora Works?"
    p = tmp_path / "qa.jsonl"
    p.write_text("".join(json.dumps(q) + "\n" for q in qa), encoding="utf-8")
    assert len(load_conversations(p)) == len(FACTS)
    ja = qa_from_facts([("マルタ", "born_in", "コリン")], lang="ja")
    assert ja[0]["question"] == "マルタはどこで生まれましたか？" and ja[0]["answer"].startswith("コリン")
