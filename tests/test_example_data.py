"""The checked-in example worlds are what the commands their experiment files name produce, byte
for byte (examples/augmentation.yaml, influence-*.yaml, demo.yaml, recipe-world.yaml, tune.yaml):
a change to the templates, the renderer or the writer that alters them fails here, and then
the examples are regenerated on purpose (with these same calls)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factlab.data.augment import augment_facts, load_facts_input, write_augmented
from factlab.data.synth import synth_chain, synth_containment, synth_world, write_world

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"

# name -> (maker, size, seed, paraphrases): `factlab data synth [--kind K] -n SIZE --seed S --paraphrases P`
WORLDS = {
    "chain-12": (synth_chain, 12, 0, 1),
    "containment-12": (synth_containment, 12, 0, 1),
    "world-p1": (synth_world, 150, 1, 1),
    "world-p3": (synth_world, 150, 1, 3),
}
# name -> (synth world (facts, seed) or None: the folder's own facts.jsonl, `factlab data augment` options)
AUGMENTED = {
    "demo-world": (None, {"phrasings": 3, "shuffled_docs": 2, "heldout_phrasings": 2, "seed": 0}),
    "recipe-world": ((60, 2026), {"phrasings": 3, "shuffled_docs": 2, "heldout_phrasings": 2, "seed": 0}),
    "tune-facts": ((60, 7), {"phrasings": 3, "heldout_phrasings": 2, "seed": 0}),
}


def tree(folder: Path, names) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for name in names for p in sorted([folder / name, *(folder / name).rglob("*")]) if p.is_file()}


@pytest.mark.parametrize("name", WORLDS)
def test_synth_examples_regenerate_byte_for_byte(tmp_path, name):
    maker, size, seed, paraphrases = WORLDS[name]
    write_world(maker(size, seed=seed, paraphrases=paraphrases), tmp_path)
    names = ["docs", "facts.jsonl", "probes.jsonl", "qa.jsonl", "world.json"]
    assert tree(tmp_path, names) == tree(EXAMPLES / name, names)


@pytest.mark.parametrize("name", AUGMENTED)
def test_augment_examples_regenerate_byte_for_byte(tmp_path, name):
    world, options = AUGMENTED[name]
    source = EXAMPLES / name / "facts.jsonl"
    if world:
        source = tmp_path / "world"
        write_world(synth_world(world[0], seed=world[1]), source)
        assert (source / "facts.jsonl").read_bytes() == (EXAMPLES / name / "facts.jsonl").read_bytes()
    facts, aliases, lang = load_facts_input(source)
    write_augmented(augment_facts(facts, lang=lang, aliases=aliases, **options), tmp_path / "out")
    names = ["docs", "probes.jsonl", "qa.jsonl", "select-probes.jsonl", "manifest.json"]
    assert tree(tmp_path / "out", names) == tree(EXAMPLES / name, names)


def test_derived_probe_files_are_what_their_experiment_files_say():
    """world-heldout-probes.jsonl: world-p3's probes without recall (examples/augmentation.yaml);
    world-p1/recall-locality-probes.jsonl: world-p1's recall and locality probes."""
    def lines(path: Path) -> list[str]:
        return path.read_text(encoding="utf-8").splitlines()

    p3, p1 = lines(EXAMPLES / "world-p3" / "probes.jsonl"), lines(EXAMPLES / "world-p1" / "probes.jsonl")
    assert lines(EXAMPLES / "world-heldout-probes.jsonl") == [x for x in p3 if json.loads(x)["kind"] != "recall"]
    assert lines(EXAMPLES / "world-p1" / "recall-locality-probes.jsonl") == [
        x for x in p1 if json.loads(x)["kind"] in ("recall", "locality")]
