"""Synthetic worlds: determinism, valid probes whose answers are facts of the world, held-out
wordings that never reach the training text, real reversals, sizes, the `data synth` CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from factlab.cli_data import data_app
from factlab.data.corpus import load_documents
from factlab.data.render import invertible_relations
from factlab.data.synth import _REAL, synth_chain, synth_containment, synth_world, write_world
from factlab.data.templates import LOCALITY, RELATIONS, prefix
from factlab.data.writer import DOCS_AS_FILES_MAX
from factlab.errors import FactlabError
from factlab.evaluate.metrics import normalize_text
from factlab.evaluate.probes import load_probes

MAKERS = {"world": synth_world, "chain": synth_chain, "containment": synth_containment}


def files_of(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def corpus_text(world) -> str:
    return normalize_text("\n".join(d["text"] for d in world.documents))


@pytest.mark.parametrize("kind", MAKERS)
@pytest.mark.parametrize("lang", ["en", "ja"])
def test_same_seed_same_bytes_different_seed_differs(tmp_path, kind, lang):
    a = files_of_written(tmp_path / "a", MAKERS[kind](40, seed=3, lang=lang, paraphrases=2))
    b = files_of_written(tmp_path / "b", MAKERS[kind](40, seed=3, lang=lang, paraphrases=2))
    c = files_of_written(tmp_path / "c", MAKERS[kind](40, seed=4, lang=lang, paraphrases=2))
    assert a == b
    assert a["facts.jsonl"] != c["facts.jsonl"] and a["probes.jsonl"] != c["probes.jsonl"]
    for name, data in a.items():
        assert data.endswith(b"\n"), name
    # sorted keys, real UTF-8 (no \u escapes) in every JSONL line
    for line in a["probes.jsonl"].decode().splitlines():
        obj = json.loads(line)
        assert list(obj) == sorted(obj) and "\\u" not in line


def files_of_written(d, world):
    write_world(world, d)
    return files_of(d)


@pytest.mark.parametrize("kind", MAKERS)
@pytest.mark.parametrize("lang", ["en", "ja"])
def test_probes_validate_and_targets_are_facts(tmp_path, kind, lang):
    world = MAKERS[kind](60, seed=1, lang=lang)
    paths = write_world(world, tmp_path)
    probes = load_probes(paths["probes"])  # raises on any invalid or duplicate probe
    assert len(probes) == len(world.probes)
    facts = {f.id: f for f in world.facts}
    kinds = {p.kind for p in probes}
    assert {"recall", "paraphrase", "reverse", "multihop", "qa"} <= kinds
    for p in probes:
        assert p.target not in p.distractors and len(set(p.distractors)) == len(p.distractors)
        if p.kind == "locality" or p.id.endswith(("-contra", "-affirm")):
            continue
        assert len(p.distractors) == 3
        if p.kind == "multihop":
            f1, f2 = (facts[i] for i in p.fact.split("+"))
            assert f1.object == f2.subject and p.target == f2.object and f1.subject in p.prompt
        elif p.kind == "reverse":
            f = facts[p.fact]
            assert p.target == f.subject and f.object in p.prompt and f.subject not in p.prompt
        else:
            f = facts[p.fact]
            assert p.target == f.object and f.subject in p.prompt


def test_reverse_probes_only_for_one_to_one_relations_and_really_reverse():
    world = synth_world(400, seed=2)
    one_to_one = invertible_relations(world.facts)
    assert {"works_at", "made_by"} <= one_to_one and "born_in" not in one_to_one
    facts = {f.id: f for f in world.facts}
    rev = [p for p in world.probes if p["kind"] == "reverse"]
    assert rev and {facts[p["fact"]].relation for p in rev} == {"works_at", "made_by"}
    for p in rev:
        f = facts[p["fact"]]
        # the forward recall prompt starts from the subject; the reverse one from the object
        assert p["prompt"].startswith("The person who works at " if f.relation == "works_at" else "The machine built by ")
        assert p["prompt"].endswith(f.object + " is") and p["target"] == f.subject
        # the distractors are other people/machines, none of them related to the object
        assert all((d, f.relation, f.object) not in {(x.subject, x.relation, x.object) for x in world.facts}
                   for d in p["distractors"])


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_recall_is_trained_and_heldout_wordings_are_not(lang):
    world = synth_world(300, seed=5, lang=lang, paraphrases=2)
    corpus = corpus_text(world)
    joiner = "" if lang == "ja" else " "
    for p in world.probes:
        text = normalize_text(p["prompt"] + joiner + p["target"])
        if p["kind"] == "recall":
            assert text in corpus, p
        elif p["kind"] in ("paraphrase", "reverse", "multihop"):
            assert text not in corpus, p
            if p["kind"] == "paraphrase":
                assert normalize_text(p["prompt"]) not in corpus, p


def test_qa_only_for_train_split_and_qa_probes_only_for_heldout(tmp_path):
    world = synth_world(200, seed=0)
    split = {f.id: f.split for f in world.facts}
    assert {"train", "heldout"} == set(split.values())
    assert world.qa and all(split[q["fact"]] == "train" for q in world.qa)
    qa_probes = [p for p in world.probes if p["kind"] == "qa"]
    assert qa_probes and all(split[p["fact"]] == "heldout" for p in qa_probes)
    questions = {q["question"] for q in world.qa}
    assert not questions & {p["prompt"] for p in qa_probes}
    # the Q&A file is valid SFT data
    from factlab.data.sft import load_conversations

    paths = write_world(world, tmp_path)
    assert len(load_conversations(paths["qa"])) == len(world.qa)


def test_sizes_exact_and_the_work_per_probe_does_not_grow_with_the_world(tmp_path, monkeypatch):
    """Distractors come from a small random sample of the pool, not a scan of all of it: the
    random draws per probe stay flat from 1,000 to 10,000 facts (a scan would grow 10x)."""
    import random

    from factlab.data import synth

    drawn = [0]

    class CountingRandom(random.Random):
        def sample(self, population, k, **kw):
            drawn[0] += k
            return super().sample(population, k, **kw)

    monkeypatch.setattr(synth.random, "Random", CountingRandom)
    per_probe, worlds = {}, {}
    for n in (1_000, 10_000):
        drawn[0] = 0
        worlds[n] = synth_world(n, seed=7)
        per_probe[n] = drawn[0] / len(worlds[n].probes)
    assert 0 < per_probe[10_000] < 1.5 * per_probe[1_000]
    monkeypatch.undo()

    small = synth_world(10)
    assert len(small.facts) == 10
    big = worlds[10_000]
    paths = write_world(big, tmp_path)
    assert len(big.facts) == 10_000 and len({f.id for f in big.facts}) == 10_000
    # one layout for every size: the corpus is docs/, here as one docs/corpus.jsonl
    assert paths["corpus"] == tmp_path / "docs" and len(big.documents) > DOCS_AS_FILES_MAX
    assert [p.name for p in paths["corpus"].iterdir()] == ["corpus.jsonl"]
    assert len(paths["facts"].read_text(encoding="utf-8").splitlines()) == 10_000
    assert len(load_documents([paths["corpus"]])) == len(big.documents)


def test_small_world_writes_txt_docs_that_load(tmp_path):
    world = synth_world(12, seed=0, lang="ja")
    paths = write_world(world, tmp_path)
    assert paths["corpus"] == tmp_path / "docs"
    docs = load_documents([paths["corpus"]])
    assert sorted(docs) == sorted(d["text"] for d in world.documents)
    summary = json.loads(paths["summary"].read_text(encoding="utf-8"))
    assert summary["n_facts"] == 12 and summary["files"]["corpus"] == "docs/"
    assert summary["counts"]["probes"]["locality"] == len(LOCALITY["ja"])


def test_write_world_refuses_non_empty_folder_and_overwrite_removes_stale_docs(tmp_path):
    write_world(synth_world(30, seed=0), tmp_path)
    with pytest.raises(FactlabError, match="not empty"):
        write_world(synth_world(30, seed=1), tmp_path)
    (tmp_path / "docs" / "stale-9.txt").write_text("old document")
    write_world(synth_world(10, seed=1), tmp_path, overwrite=True)
    assert not (tmp_path / "docs" / "stale-9.txt").exists()


def test_paraphrases_give_differently_worded_documents_of_the_same_facts():
    world = synth_world(40, seed=0, paraphrases=3)
    by_entity: dict[str, list[str]] = {}
    for d in world.documents:
        by_entity.setdefault(d["entity"], []).append(d["text"])
    assert all(len(v) == 3 and len(set(v)) == 3 for v in by_entity.values())
    # every fact's object is stated in each of its subject's documents
    for f in world.facts:
        assert any(all(f.subject in t and f.object in t for t in v) for v in by_entity.values()), f


def test_names_are_invented_unique_and_distractors_share_the_type():
    world = synth_world(2_000, seed=11)
    names = list(world.entity_types)
    assert len(names) == len(set(names))
    words = [w.casefold() for n in names for w in n.split()]
    assert not set(words) & _REAL
    for p in world.probes:
        t = world.entity_types.get(p["target"])
        if p["kind"] in ("recall", "paraphrase", "reverse", "multihop") and t:
            decoys = set(world.decoys.get(t, []))
            assert all(world.entity_types.get(d) == t or d in decoys for d in p["distractors"]), p


def test_tiny_world_tops_up_distractors_with_decoys_never_trained():
    world = synth_world(10, seed=0)
    corpus = "\n".join(d["text"] for d in world.documents)
    decoys = [d for names in world.decoys.values() for d in names]
    assert decoys and not any(d in corpus for d in decoys)
    assert all(len(p["distractors"]) == 3 for p in world.probes)


@pytest.mark.parametrize("lang", ["en", "ja"])
def test_template_prompts_are_distinctive(lang):
    """A recall prompt must not be a prefix of another relation's sentence about the same
    subject ("X was born in" vs "X was born in the year"), and must say more than the
    subject ("ノウは" is no question)."""
    specs = RELATIONS[lang].values()
    for a in specs:
        for t in a.doc + a.heldout:
            p = prefix(t, "o", s="SUBJ")
            assert len(p.replace("SUBJ", "").strip()) >= 3, (a.name, t)
            for b in specs:
                if b.name != a.name and b.subject_type == a.subject_type:
                    for u in b.doc:
                        assert not u.replace("{s}", "SUBJ").startswith(p + ("" if lang == "ja" else " ")), (a.name, t, u)


def test_locality_lists():
    assert len(LOCALITY["en"]) >= 30 and len(LOCALITY["ja"]) >= 10
    for facts in LOCALITY.values():
        for prompt, target, distractors in facts:
            assert target not in distractors and len(distractors) == 3


def test_chain_probes():
    world = synth_chain(8, seed=0)
    nodes = [world.facts[0].subject] + [f.object for f in world.facts]
    pos = {n: i for i, n in enumerate(nodes)}
    assert len(world.facts) == 8 and all(f.relation == "causes" for f in world.facts)
    by_kind: dict[str, list[dict]] = {}
    for p in world.probes:
        by_kind.setdefault(p["kind"], []).append(p)
    for p in by_kind["recall"]:
        s = p["prompt"].split(" ")[0]
        assert pos[p["target"]] == pos[s] + 1
        assert all(pos.get(d, -1) < pos[s] for d in p["distractors"])  # upstream or decoys
    for p in by_kind["reverse"]:
        o = p["prompt"].split(" ")[0]
        assert pos[p["target"]] == pos[o] - 1 and all(pos.get(d, 99) > pos[o] for d in p["distractors"])
    assert [pos[p["target"]] - pos[p["prompt"].split(" ")[0]] for p in by_kind["multihop"]] == [2] * 7
    contra = [p for p in by_kind["qa"] if p["id"].endswith("-contra")]
    assert len(contra) == 8 and all(p["target"] == "No" and p["distractors"] == ["Yes"] for p in contra)


def test_containment_probes():
    world = synth_containment(10, seed=0)
    parent = {f.subject: f.object for f in world.facts}
    for p in world.probes:
        if p["kind"] == "recall":
            s = p["prompt"].rsplit(" is", 1)[0].split(" ")[0]
            assert p["target"] == parent[s] and parent.get(parent[s]) not in p["distractors"]
        if p["kind"] == "reverse":
            container = p["prompt"].split(" ")[0]
            assert parent[p["target"]] == container
            assert all(parent.get(parent.get(d)) != container for d in p["distractors"])
        if p["kind"] == "multihop":
            assert p["target"] == parent[parent[p["prompt"].split(" ")[0]]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_facts=0), "from 1 to"),
    (dict(n_facts=10, lang="fr"), "unknown language"),
    (dict(n_facts=10, paraphrases=0), "paraphrases"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(FactlabError, match=message):
        synth_world(**kwargs)


# ------------------------------------------------------------------ CLI


def test_cli_synth_writes_and_refuses_to_overwrite(tmp_path):
    runner = CliRunner()
    out = tmp_path / "w"
    res = runner.invoke(data_app, ["synth", "--facts", "25", "--seed", "1", "--lang", "ja", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "probes.jsonl").is_file() and (out / "docs").is_dir()
    assert len(load_probes(out / "probes.jsonl")) > 25
    res = runner.invoke(data_app, ["synth", "--facts", "25", "-o", str(out)])
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "not empty" in res.stderr and "--force" in res.stderr
    res = runner.invoke(data_app, ["synth", "--facts", "25", "--kind", "chain", "-o", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "world.json").read_text(encoding="utf-8"))["kind"] == "chain"


@pytest.mark.parametrize("args, message", [
    (["--kind", "tree"], "unknown --kind"),
    (["--lang", "fr"], "unknown language"),
    (["--facts", "0"], "from 1 to"),
])
def test_cli_synth_bad_input_is_one_line_exit_2(tmp_path, args, message):
    res = CliRunner().invoke(data_app, ["synth", "-o", str(tmp_path / "w"), *args])
    assert res.exit_code == 2 and message in res.stderr and res.stderr.count("\n") == 1
