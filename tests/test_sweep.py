"""Sweeps, the run store, resume after SIGKILL, and reports built from stored runs."""

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from factlab.config import experiment_from_dict
from factlab.errors import FactlabError
from factlab.experiment.store import RunStore, config_hash, flatten_metrics
from factlab.experiment.sweep import expand_sweep


def test_grid_times_repeats():
    exp = experiment_from_dict({
        "name": "s", "model": "m", "seed": 10,
        "stages": [{"kind": "cpt"}],
        "sweep": {"stages.0.peft.targets": [["attention"], ["mlp"], ["all"]], "stages.0.train.lr": [1e-4, 5e-4], "repeat": 2},
    })
    points = expand_sweep(exp)
    assert len(points) == 3 * 2 * 2
    assert points[0].overrides == {"stages.0.peft.targets": ["attention"], "stages.0.train.lr": 1e-4, "seed": 10}
    assert points[1].overrides["seed"] == 11 and points[2].overrides["stages.0.train.lr"] == 5e-4
    assert points[-1].experiment.stages[0].peft.targets == ["all"] and points[-1].experiment.seed == 11
    assert len({p.folder for p in points}) == len(points)
    assert len({config_hash(p.experiment.model_dump(mode="json")) for p in points}) == len(points)
    assert all(p.experiment.sweep == {} for p in points)


def test_explicit_points_pair_settings_and_cross_the_grid():
    exp = experiment_from_dict({
        "name": "s", "model": "m", "stages": [{"kind": "cpt"}],
        "sweep": {"points": [{"stages.0.peft.method": "lora", "stages.0.train.lr": 1e-3},
                             {"stages.0.peft.method": "ia3", "stages.0.train.lr": 1e-2}],
                  "stages.0.train.epochs": [1, 2]},
    })
    points = expand_sweep(exp)
    assert [(p.experiment.stages[0].peft.method, p.experiment.stages[0].train.lr, p.experiment.stages[0].train.epochs)
            for p in points] == [("lora", 1e-3, 1), ("lora", 1e-3, 2), ("ia3", 1e-2, 1), ("ia3", 1e-2, 2)]
    assert points[2].label == "cpt.method=ia3 cpt.lr=0.01 cpt.epochs=1"


def test_bad_sweep_blocks():
    for sweep, expected in [({"repeat": 0}, "sweep.repeat"), ({"seed": 3}, "non-empty list"),
                            ({"points": [{}]}, "sweep.points"), ({"points": {"a": 1}}, "sweep.points")]:
        with pytest.raises(FactlabError, match=expected):
            experiment_from_dict({"name": "s", "model": "m", "sweep": sweep})
    exp = experiment_from_dict({"name": "s", "model": "m", "stages": [{"kind": "cpt"}], "sweep": {"stages.0.peft.r": [4, "x"]}})
    with pytest.raises(FactlabError, match="stages.0.peft.r"):
        expand_sweep(exp)


def test_store_round_trip(tmp_path):
    store = RunStore(tmp_path / "db.sqlite")
    cfg = {"name": "a", "seed": 0, "output_dir": "x"}
    store.start(tmp_path / "r1", "a", cfg, sweep="s", point={"lr": 1})
    assert store.runs(status="running")[0]["run_dir"] == str(tmp_path / "r1")
    assert store.done_point("s", config_hash(cfg)) is None
    results = {"summaries": {"base": {"recall": {"n": 2, "accuracy": {"n": 2, "k": 1, "rate": 0.5, "ci_low": 0.1, "ci_high": 0.9}}}},
               "stages": [{"name": "cpt", "tokens_per_second": 100.0, "peak_rss_mb": 5.0, "final_loss": 1.5}]}
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "results.json").write_text(json.dumps(results))
    store.finish(tmp_path / "r1", results)
    (row,) = store.runs(sweep="s")
    assert row["status"] == "done" and row["tokens_per_s"] == 100.0 and json.loads(row["point"]) == {"lr": 1}
    assert store.done_point("s", config_hash({**cfg, "output_dir": "elsewhere"})) == str(tmp_path / "r1")
    m = {(x["stage"], x["kind"], x["metric"]): x for x in store.metrics(str(tmp_path / "r1"))}
    assert m[("base", "recall", "accuracy")]["value"] == 0.5 and m[("base", "recall", "accuracy")]["n"] == 2
    assert m[("cpt", "train", "final_loss")]["value"] == 1.5
    assert len(m) == len(flatten_metrics(results))


def sweep_project(tmp_path, tiny_dir, steps=2):
    (tmp_path / "docs.txt").write_text("Marta Ilvane runs the press line. Jonas Perl leads the night shift.\n")
    (tmp_path / "probes.jsonl").write_text(
        json.dumps({"id": "p1", "kind": "recall", "prompt": "The press line is run by", "target": "Marta Ilvane", "distractors": ["Jonas Perl"]}) + "\n"
        + json.dumps({"id": "l1", "kind": "locality", "prompt": "The quick brown fox", "target": "jumps", "distractors": ["sleeps"]}) + "\n")
    exp = {
        "name": "sw", "model": str(tiny_dir), "output_dir": str(tmp_path / "runs"),
        "data": {"corpus": "docs.txt"},
        "stages": [{"kind": "cpt", "peft": {"targets": ["mlp"], "r": 2}, "train": {"max_steps": steps, "batch_size": 2, "seq_len": 8, "bf16": False}}],
        "eval": {"probes": "probes.jsonl", "sampling": {"n": 2, "max_new_tokens": 3}},
        "sweep": {"stages.0.peft.targets": [["attention"], ["mlp"], ["all"]]},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    return tmp_path / "exp.yaml"


def factlab(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "factlab", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def db_rows(db: Path) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return c.execute("SELECT run_dir, status, started FROM runs ORDER BY run_dir").fetchall()
    except sqlite3.OperationalError:
        return []


def training_after_a_finished_point(db: Path):
    """The state to kill a sweep in: a point done, and a later one training (its stage's
    .partial folder, which the Trainer writes into, exists)."""
    def ready() -> bool:
        rows = db_rows(db)
        running = [r for r in rows if r[1] == "running"]
        return (any(r[1] == "done" for r in rows) and len(running) == 1
                and (Path(running[0][0]) / "stages" / "1-cpt.partial").is_dir())
    return ready


def test_sweep_killed_mid_run_resumes_and_loses_nothing(tmp_path, tiny_dir, monkeypatch, capsys):
    from cli_helpers import kill_when, run_cli

    exp = sweep_project(tmp_path, tiny_dir, steps=50)
    db = tmp_path / "runs" / "factlab.db"
    kill_when(factlab("sweep", exp), training_after_a_finished_point(db), "a point trained after a finished one")
    before = db_rows(db)
    done = [r for r in before if r[1] == "done"]
    (killed,) = [r for r in before if r[1] == "running"]
    assert done and len(before) <= 3
    assert (Path(killed[0]) / "stages" / "1-cpt.partial").is_dir()  # killed inside its training

    # The resume: the same command, in this process (the interpreter is not what it tests).
    code, _, err = run_cli(monkeypatch, capsys, "sweep", exp)
    assert code == 0, err[-2000:]
    after = db_rows(db)
    assert [r[1] for r in after] == ["done", "done", "done"]
    assert all(r in after for r in done)  # the finished points were skipped, not redone
    (redone,) = [r for r in after if r[0] == killed[0]]
    assert redone[2] > killed[2]  # the interrupted one was redone, in its own folder
    for run_dir, _, _ in after:
        results = json.loads((Path(run_dir) / "results.json").read_text())
        assert list(results["summaries"]) == ["base", "cpt"]
        assert not list(Path(run_dir).rglob("*.partial"))
    assert "skip" in err


def test_dry_run_and_report_from_the_store(tmp_path, tiny_dir, monkeypatch, capsys):
    from factlab import cli

    exp = sweep_project(tmp_path, tiny_dir)

    def call(*args):
        monkeypatch.setattr(sys, "argv", ["factlab", *map(str, args)])
        try:
            cli.main()
        except SystemExit as e:
            assert e.code in (0, None)
        return capsys.readouterr()

    out = call("sweep", exp, "--dry-run").out
    assert "3 runs" in out and "cpt.targets=attention" in out and not (tmp_path / "runs" / "sw").exists()
    call("sweep", exp)
    store = tmp_path / "runs" / "factlab.db"
    assert "done" in call("runs", "--store", store).out

    # the report needs no model: make loading one fail loudly
    import factlab.models.loading as loading
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("report loaded a model"))
    html_path = tmp_path / "report.html"
    call("report", "sw", "--store", store, "-o", html_path, "--probe", "p1")
    text = html_path.read_text()
    for label in ("cpt.targets=attention", "cpt.targets=mlp", "cpt.targets=all"):
        assert label in text
    assert "Pareto" in text and "data:image/png;base64," in text and "Answers to" in text
    assert "<h2>Training</h2>" in text and "(untrained)" in text
    assert text.count("</td><td>base</td><td style='text-align:left'>") == 1  # base answers once, not per variant
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", text) and "http://" not in text and "https://" not in text

    md = tmp_path / "report.md"
    call("report", "sw", "--store", store, "-o", md, "--format", "md")
    assert "| variant |" in md.read_text() and (tmp_path / "report_files" / "figure1.png").is_file()

    runs = sorted((tmp_path / "runs" / "sw").iterdir())
    assert "runs side by side" in call("compare", *runs[:2]).out


def test_mlflow_flag_without_mlflow_is_a_clear_error(monkeypatch):
    from factlab.experiment.mlflow_log import require_mlflow

    monkeypatch.setitem(sys.modules, "mlflow", None)  # makes `import mlflow` raise ImportError
    with pytest.raises(FactlabError, match="pip install mlflow"):
        require_mlflow()


def test_sweep_evaluates_the_base_model_once(tmp_path, tiny_dir, monkeypatch):
    from factlab.config import load_experiment
    from factlab.experiment.evaluation import Evaluator
    from factlab.experiment.sweep import run_sweep

    labels = []
    real = Evaluator.evaluate
    monkeypatch.setattr(Evaluator, "evaluate", lambda self, label, *a, **k: labels.append(label) or real(self, label, *a, **k))
    exp = load_experiment(sweep_project(tmp_path, tiny_dir))
    folders = run_sweep(exp, RunStore(tmp_path / "db.sqlite"))
    assert labels.count("base") == 1 and labels.count("cpt") == 3
    first = [json.loads(x) for x in (folders[0] / "scores" / "base.jsonl").read_text().splitlines()]
    for f in folders[1:]:
        assert [json.loads(x) for x in (f / "scores" / "base.jsonl").read_text().splitlines()] == first
        res = json.loads((f / "results.json").read_text())
        assert res["summaries"]["base"] == json.loads((folders[0] / "results.json").read_text())["summaries"]["base"]


def test_sweep_trains_a_shared_first_stage_once_and_gets_what_separate_runs_get(tmp_path, tiny_dir, monkeypatch):
    """A sweep over the second stage's settings trains the first stage once; every point's
    results equal those of the same experiment run alone (CPU runs are deterministic)."""
    import factlab.experiment.runner as runner
    from factlab.config import load_experiment
    from factlab.experiment.sweep import run_sweep

    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in
                                               [("Who runs the press line?", "Marta Ilvane."), ("Who leads the night shift?", "Jonas Perl.")]))
    exp_path = sweep_project(tmp_path, tiny_dir)
    raw = yaml.safe_load(exp_path.read_text())
    raw["data"]["qa"] = "qa.jsonl"
    raw["stages"].append({"kind": "sft", "peft": {"targets": ["attention"], "r": 2},
                          "train": {"max_steps": 2, "batch_size": 2, "seq_len": 32, "bf16": False}})
    raw["sweep"] = {"stages.1.peft.alpha": [4, 16]}
    exp_path.write_text(yaml.safe_dump(raw))

    trained = []
    real = runner.train_stage
    monkeypatch.setattr(runner, "train_stage", lambda m, t, st, name, *a, **k: trained.append(name) or real(m, t, st, name, *a, **k))
    folders = run_sweep(load_experiment(exp_path), RunStore(tmp_path / "db.sqlite"))
    assert trained == ["cpt", "sft", "sft"]
    second = json.loads((folders[1] / "results.json").read_text())
    assert second["stages"][0]["reused_from"] == str(folders[0] / "stages" / "1-cpt")
    assert (folders[1] / "stages" / "1-cpt" / "merged" / "config.json").is_file()
    assert (folders[1] / "scores" / "cpt.jsonl").read_text() == (folders[0] / "scores" / "cpt.jsonl").read_text()

    # the same point, alone, in a fresh process state
    raw.pop("sweep")
    raw["stages"][1]["peft"]["alpha"] = 16
    raw["output_dir"] = str(tmp_path / "alone")
    exp_path.write_text(yaml.safe_dump(raw))
    alone_dir = runner.run_experiment(load_experiment(exp_path))
    alone = json.loads((alone_dir / "results.json").read_text())
    assert alone["summaries"] == second["summaries"] and alone["perplexity"] == second["perplexity"]
    for a, b in zip(alone["stages"], second["stages"]):
        assert a["final_loss"] == b["final_loss"] and a["first_loss"] == b["first_loss"]
    assert trained == ["cpt", "sft", "sft", "cpt", "sft"]


def test_config_hash_follows_the_contents_of_the_data_files(tmp_path):
    """A finished sweep point whose corpus (file or folder) or probes were edited is no longer
    the same point: restarting the sweep redoes it instead of skipping it."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Marta runs the press line.")
    probes = tmp_path / "probes.jsonl"
    probes.write_text("{}\n")
    cfg = {"name": "x", "model": "m", "output_dir": "runs", "data": {"corpus": [str(docs)]}, "eval": {"probes": [str(probes)]}}
    h = config_hash(cfg)
    assert config_hash({**cfg, "output_dir": "elsewhere"}) == h
    (docs / "a.txt").write_text("Jonas runs the press line.")
    h2 = config_hash(cfg)
    assert h2 != h
    (docs / "b.txt").write_text("A new document.")
    h3 = config_hash(cfg)
    assert h3 != h2
    probes.write_text('{"id": 1}\n')
    assert config_hash(cfg) != h3
