"""Data checks: corpus warnings with counts, Q&A and probe-set problems, leakage of probes
into the training data (planted leaks found, a clean world reports nothing), `data check`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from factlab.cli_data import data_app
from factlab.data.checks import check_corpus, check_probes, check_qa, find_leakage
from factlab.data.synth import synth_chain, synth_containment, synth_world, write_world


def test_check_corpus_counts_empty_duplicate_and_broken_documents():
    docs = ["Marta works at Velmora.", "", "  \n", "Marta works at Velmora.", "caf\ufffd"]
    w = check_corpus(docs)
    assert any(x.startswith("2 of 5 documents are empty (1, 2)") for x in w)
    assert any(x.startswith("1 of 5 documents repeat an earlier one exactly (3)") for x in w)
    assert any("1 documents contain U+FFFD" in x for x in w)
    assert check_corpus(["One fine document."]) == []


def test_check_corpus_long_lines_with_a_tokenizer_and_estimated(tok):
    docs = ["short line\n" + "Marta Ilvane runs the press line. " * 20, "ok"]
    w = check_corpus(docs, tokenizer=tok, max_len=32, names=["a.txt", "b.txt"])
    assert len(w) == 1 and w[0].startswith("1 lines are longer than max_len=32 tokens (longest: ")
    assert "a.txt line 2" in w[0]
    longest = len(tok(docs[0].splitlines()[1], add_special_tokens=False)["input_ids"])
    assert f"longest: {longest}," in w[0]
    assert check_corpus(docs, tokenizer=tok, max_len=10_000) == []
    est = check_corpus(docs, max_len=32)
    assert len(est) == 1 and "estimated" in est[0]


def test_check_qa_finds_contradictions_and_duplicates():
    pairs = [{"question": "Where does Marta work?", "answer": "Velmora."},
             {"question": "where does marta work", "answer": "Korrin Mills."},
             {"question": "Who is Jonas?", "answer": "A printer."},
             {"question": "Who is Jonas?", "answer": "A printer."}]
    w = check_qa(pairs)
    assert any(x.startswith("1 questions have different answers") for x in w)
    assert any(x.startswith("1 Q&A pairs repeat") for x in w)
    assert check_qa(pairs[:1]) == []


def test_check_probes():
    probes = [
        {"id": "a", "kind": "recall", "prompt": "X is in", "target": "Y", "distractors": ["Y", "Z"]},
        {"id": "b", "kind": "recall", "prompt": "X is in", "target": "Z", "distractors": ["W", "W"]},
        {"id": "c", "kind": "qa", "prompt": "Q?", "target": "A", "distractors": []},
    ]
    w = " | ".join(check_probes(probes))
    assert "1 probes list their target among the distractors (a)" in w
    assert "1 probes repeat a distractor (b)" in w
    assert "1 prompts have different targets" in w
    assert "1 probes have no distractors (c)" in w


@pytest.mark.parametrize("make, lang", [(synth_world, "en"), (synth_world, "ja"), (synth_chain, "en"),
                                        (synth_containment, "ja")])
def test_clean_world_has_no_leakage(make, lang):
    world = make(300, seed=4, lang=lang, paraphrases=3)
    train = [d["text"] for d in world.documents] + [f"{q['question']}\n{q['answer']}" for q in world.qa]
    assert find_leakage(train, world.probes) == []
    assert check_probes(world.probes) == []  # and the generated probe set itself is well-formed


def test_planted_leaks_are_found():
    world = synth_world(200, seed=1)
    train = [d["text"] for d in world.documents] + [f"{q['question']}\n{q['answer']}" for q in world.qa]
    para = next(p for p in world.probes if p["kind"] == "paraphrase")
    rev = next(p for p in world.probes if p["kind"] == "reverse")
    qa = next(p for p in world.probes if p["kind"] == "qa")
    loc = next(p for p in world.probes if p["kind"] == "locality")
    planted = train + [
        f"Some notes. {para['prompt']} {para['target']}. More notes.",   # the held-out wording, answered
        f"{rev['prompt'].upper()}: {rev['target']}!",                     # case and punctuation differ
        f"{qa['prompt']}\n{qa['target']}.",                               # a held-out question in the Q&A
        f"As everyone knows, {loc['prompt']} {loc['target']}.",
    ]
    leaks = find_leakage(planted, world.probes)
    got = {(x["probe"], x["reason"]) for x in leaks}
    assert (para["id"], "answer in training text") in got
    assert (para["id"], "held-out wording in training text") in got
    assert (rev["id"], "answer in training text") in got
    assert (qa["id"], "prompt is a training line") in got and (qa["id"], "answer in training text") in got
    assert (loc["id"], "answer in training text") in got
    assert all(x["train_index"] >= len(train) for x in leaks)
    assert len(got) == 6


def test_leakage_respects_word_boundaries_min_chars_and_recall():
    probes = [{"id": "p", "kind": "paraphrase", "prompt": "The capital of Italy is", "target": "Rome", "distractors": []},
              {"id": "r", "kind": "recall", "prompt": "The capital of Italy is", "target": "Rome", "distractors": []},
              {"id": "s", "kind": "reverse", "prompt": "It is", "target": "Rome", "distractors": []}]
    assert find_leakage(["the capital of italy is romeo, said nobody"], probes[:1]) == [
        {"probe": "p", "kind": "paraphrase", "reason": "held-out wording in training text",
         "text": "the capital of italy is", "train_index": 0}]
    assert find_leakage(["The capital of Italy is Rome."], probes[1:]) == []  # recall: by design; "it is rome": too short


def test_leakage_in_japanese_text():
    probes = [{"id": "j", "kind": "multihop", "prompt": "マルタ・イルヴァンの勤務先がある町は", "target": "コリン", "distractors": []}]
    leaks = find_leakage(["前置き。マルタ・イルヴァンの勤務先がある町はコリンだ。"], probes, min_chars=10)
    assert [x["reason"] for x in leaks] == ["answer in training text"]
    assert find_leakage(["マルタ・イルヴァンの勤務先がある町はコリンズだ。"], probes, min_chars=10) != []  # no word boundaries in CJK


# ------------------------------------------------------------------ CLI


@pytest.fixture()
def world_dir(tmp_path):
    write_world(synth_world(40, seed=0), tmp_path / "w")
    return tmp_path / "w"


def test_cli_check_clean_world(world_dir):
    res = CliRunner().invoke(data_app, ["check", "-c", str(world_dir / "docs"), "--qa", str(world_dir / "qa.jsonl"),
                                        "-p", str(world_dir / "probes.jsonl")])
    assert res.exit_code == 0, res.output
    assert "no warnings" in res.stdout and "no leakage" in res.stdout


def test_cli_check_reports_planted_leak_and_strict_fails(world_dir):
    para = next(json.loads(line) for line in (world_dir / "probes.jsonl").read_text(encoding="utf-8").splitlines()
                if json.loads(line)["kind"] == "paraphrase")
    (world_dir / "docs" / "zz-leak.txt").write_text(f"{para['prompt']} {para['target']}.\n", encoding="utf-8")
    (world_dir / "docs" / "zz-empty.txt").write_text("\n", encoding="utf-8")
    args = ["check", "-c", str(world_dir / "docs"), "-p", str(world_dir / "probes.jsonl")]
    res = CliRunner().invoke(data_app, args)
    assert res.exit_code == 0, res.output
    assert para["id"] in res.stdout and "leakage: 2 probe texts" in res.stdout
    assert "documents are empty" in res.stdout
    assert CliRunner().invoke(data_app, args + ["--strict"]).exit_code == 1


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("bad-probes", "probes.jsonl:2: malformed JSON"),
    ("empty-corpus", "the corpus is empty"),
    ("nothing", "nothing to check"),
])
def test_cli_check_unreadable_input_exit_2(tmp_path, setup, message):
    args = ["check"]
    if setup == "missing":
        args += ["-c", str(tmp_path / "nope.txt")]
    elif setup == "bad-probes":
        (tmp_path / "probes.jsonl").write_text('{"id": "a", "kind": "recall", "prompt": "p", "target": "t"}\n{oops\n')
        args += ["-p", str(tmp_path / "probes.jsonl")]
    elif setup == "empty-corpus":
        (tmp_path / "c.txt").write_text("\n")
        args += ["-c", str(tmp_path / "c.txt")]
    res = CliRunner().invoke(data_app, args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr and res.stderr.count("\n") == 1
