"""Experiment files: validation messages name the key; overrides; paths; stage names."""

from pathlib import Path

import pytest

from factlab.config import dump_experiment, experiment_from_dict, load_experiment
from factlab.errors import FactlabError

MINIMAL = """
name: t
model: smollm2-135m
data: {corpus: docs.txt, qa: qa.jsonl}
stages:
  - kind: cpt
    peft: {targets: [mlp], r: 4}
    train: {lr: 5.0e-4}
  - kind: sft
eval: {probes: probes.jsonl}
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_loads_defaults_and_resolves_paths_against_the_file(tmp_path):
    exp = load_experiment(write(tmp_path, MINIMAL))
    assert exp.stages[0].peft.targets == ["mlp"] and exp.stages[0].peft.r == 4
    assert exp.stages[1].peft.targets == ["all-but-embed"]  # default
    assert exp.stages[0].train.lr == 5e-4 and exp.stages[1].train.lr == 1e-4
    assert exp.data.corpus == [str(tmp_path / "docs.txt")]
    assert exp.data.qa == str(tmp_path / "qa.jsonl")
    assert exp.eval.probes == [str(tmp_path / "probes.jsonl")]
    assert exp.stage_names() == ["cpt", "sft"]


def test_dump_round_trips(tmp_path):
    exp = load_experiment(write(tmp_path, MINIMAL))
    again = experiment_from_dict(__import__("yaml").safe_load(dump_experiment(exp)))
    assert again.model_dump() == exp.model_dump()


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("lr: 5.0e-4", "lrr: 5.0e-4"), "stages.0.train.lrr: unknown key"),
        (("r: 4", "r: four"), "stages.0.peft.r:"),
        (("r: 4", "r: 0"), "stages.0.peft.r:"),
        (("kind: sft", "kind: rlhf"), "stages.1.kind:"),
        (("model: smollm2-135m", "modle: smollm2-135m"), "modle: unknown key"),
        (("train: {lr: 5.0e-4}", "train: {lr: 5.0e-4, warmup_steps: 3, warmup_ratio: 0.1}"), "not both"),
        (("train: {lr: 5.0e-4}", "train: {early_stopping_patience: 2}"), "eval_fraction"),
        (("train: {lr: 5.0e-4}", "train: {batch_size: 8, micro_batch_size: 3}"), "micro_batch_size (3) must divide"),
    ],
)
def test_errors_name_the_key(tmp_path, edit, expected):
    p = write(tmp_path, MINIMAL.replace(*edit))
    with pytest.raises(FactlabError) as e:
        load_experiment(p)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg and str(p) in msg


def test_merge_false_before_a_later_stage_is_rejected(tmp_path):
    p = write(tmp_path, MINIMAL.replace("  - kind: sft", "    merge: false\n  - kind: sft"))
    with pytest.raises(FactlabError, match="merge: false"):
        load_experiment(p)


@pytest.mark.parametrize("text, expected", [
    ("name: [unclosed\n", "not valid YAML at line"),
    ("", "is empty"),
    ("- a\n- b\n", "must be a YAML mapping"),
])
def test_malformed_yaml(tmp_path, text, expected):
    with pytest.raises(FactlabError, match=expected):
        load_experiment(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(FactlabError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml")


def test_not_utf8(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(FactlabError, match="not UTF-8"):
        load_experiment(p)


def test_overrides(tmp_path):
    p = write(tmp_path, MINIMAL)
    exp = load_experiment(p, ["stages.0.train.lr=1e-3", "stages.1.peft.targets=[attention, mlp]", "seed=7", "stages.0.peft.layers=0-3"])
    assert exp.stages[0].train.lr == 1e-3
    assert exp.stages[1].peft.targets == ["attention", "mlp"]
    assert exp.seed == 7 and exp.stages[0].peft.layers == "0-3"


@pytest.mark.parametrize("item, expected", [
    ("stages.5.train.lr=1", "not an index"),
    ("stages.0.train.lrx=1", "stages.0.train.lrx: unknown key"),
    ("seed", "has no '='"),
    ("name.x=1", "is a value, not a section"),
])
def test_bad_overrides(tmp_path, item, expected):
    with pytest.raises(FactlabError, match=expected):
        load_experiment(write(tmp_path, MINIMAL), [item])


def test_repeated_kinds_are_numbered_and_names_must_be_unique():
    raw = {"name": "x", "model": "m", "stages": [{"kind": "cpt"}, {"kind": "cpt"}, {"kind": "sft"}]}
    assert experiment_from_dict(raw).stage_names() == ["cpt1", "cpt2", "sft"]
    raw["stages"][2]["name"] = "cpt1"
    with pytest.raises(FactlabError, match="not unique"):
        experiment_from_dict(raw)
    raw["stages"][2]["name"] = "base"
    with pytest.raises(FactlabError, match="reserved"):
        experiment_from_dict(raw)


def test_sweep_paths_resolve_against_the_experiment_file(tmp_path):
    from factlab.experiment.sweep import expand_sweep

    p = write(tmp_path, MINIMAL + "sweep:\n  data.corpus: [[a.txt], [b/]]\n")
    points = expand_sweep(load_experiment(p))
    assert [pt.experiment.data.corpus for pt in points] == [[str(tmp_path / "a.txt")], [str(tmp_path / "b")]]
