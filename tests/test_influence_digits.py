"""The digits CNN experiment: the in-memory restore leaves no trace, the class split is computed
right on a hand-built matrix, bad specs fail with one line, and a tiny run writes its files."""

import json

import numpy as np
import pytest
import torch

from factlab.errors import FactlabError
from factlab.influence import digits
from factlab.influence.digits import DigitsSpec, NoiseLevel


def _tiny_spec(**kw):
    base = dict(pretrain_classes=[0, 1], classes=[0, 1, 5], per_class=2, pretrain_epochs=1,
                noise=[NoiseLevel(), NoiseLevel(pixel=0.3), NoiseLevel(label=1.0)])
    base.update(kw)
    return DigitsSpec(**base)


def test_restore_leaves_no_trace():
    spec = _tiny_spec(steps=2, optimizer="adam", lr=0.01)
    split = digits.load_split(spec)
    net, _ = digits.pretrain(spec, split)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = digits.DigitsRowTrainer(net, spec)
    x, y = split["x_held"], split["y_held"]
    order = [3, 0, 3, 5]  # row 3 first, then again after another row
    M = digits.eif_matrix(trainer, x[order], y[order], x, y)
    assert np.array_equal(M[0], M[2])
    assert not np.array_equal(M[0], M[1])
    fresh = digits.DigitsRowTrainer(net, spec)
    alone = digits.eif_matrix(fresh, x[[3]], y[[3]], x, y)
    assert np.array_equal(alone[0], M[0])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # handed back at θ_0


def test_class_split_on_a_hand_built_matrix():
    classes = np.array([0, 0, 1, 1, 1])
    same = classes[:, None] == classes[None, :]
    M = np.where(same, -2.0, 1.0)
    M[np.diag_indices(5)] = -100.0  # self-influence must be left out
    M[0, 1] = -4.0  # within entries: -4 and seven -2s
    out = digits.class_split(M, classes, classes)
    assert out["within"]["value"] == pytest.approx((-4.0 - 2.0 * 7) / 8)
    assert out["within"]["n"] == 8 and out["across"]["n"] == 12
    assert out["across"]["value"] == pytest.approx(1.0)
    assert out["difference"]["value"] == pytest.approx(-2.25 - 1.0)
    assert out["difference"]["ci_low"] <= out["difference"]["value"] <= out["difference"]["ci_high"]


@pytest.mark.parametrize("block,match", [
    ({"per_class": 0}, "per_class"),
    ({"classes": [3, 11]}, "digits 0-9"),
    ({"classes": [3]}, "classes"),
    ({"lrr": 0.1}, "lrr: unknown key"),
    ({"noise": [{"label": 1.5}]}, "noise.0.label"),
    ({"optimizer": "lion"}, "optimizer"),
])
def test_bad_spec_is_one_line(block, match):
    with pytest.raises(FactlabError, match=match) as e:
        digits.load_spec(block)
    assert "\n" not in str(e.value)


def test_cli_entry_refuses_a_file_without_the_block(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: x\ninfluence: {task: digits}\n")
    assert digits.main([str(exp), "--out", str(tmp_path / "out")]) == 2
    assert "influence.digits" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tiny_run_writes_matrix_metrics_and_heatmap(tmp_path):
    spec = _tiny_spec()
    res = digits.run_digits(spec, tmp_path)
    assert set(res["levels"]) == {"clean", "pixel0.3", "label1"}
    assert res["levels"]["label1"]["labels_flipped"] == 6  # every label replaced at p = 1
    assert res["levels"]["pixel0.3"]["labels_flipped"] == 0
    z = np.load(tmp_path / "digits-eif.npz")
    assert z["eif_clean"].shape == (6, 6) and list(z["labels"]) == [0, 0, 1, 1, 5, 5]
    assert np.all(np.diag(z["eif_clean"]) < 0)  # a step on a sample lowers its own loss
    assert json.loads((tmp_path / "digits.json").read_text())["samples"] == 6
    assert (tmp_path / "digits-eif.png").stat().st_size > 0


def test_factlab_influence_runs_the_digits_task(tmp_path, monkeypatch, capsys):
    """`factlab influence` on a file with `task: digits` runs the CNN experiment (the command
    the example names), through the entry point as a user would call it."""
    from cli_helpers import run_cli

    exp = tmp_path / "exp.yaml"
    exp.write_text("name: d\ninfluence:\n  task: digits\n  digits: {pretrain_classes: [0, 1], classes: [0, 1, 5], "
                   "per_class: 2, pretrain_epochs: 1, noise: [{}]}\n")
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "influence", exp, "-o", out)
    assert code == 0, err
    # -o is the parent folder, as for every influence run: the result is <parent>/<name>-digits
    assert json.loads((out / "d-digits" / "digits.json").read_text())["samples"] == 6
    code, _, err = run_cli(monkeypatch, capsys, "influence", exp, "-o", out)
    assert code == 2 and "already holds a digits result" in err
