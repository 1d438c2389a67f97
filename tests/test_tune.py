"""`factlab tune`: the tune: block is validated before anything runs; a study on a tiny model
runs 3 trials, prunes one (a threshold on the damage figure, which a huge learning rate
certainly blows up), resumes after SIGKILL without repeating a finished trial, and its
report lists the Pareto front and says which probe files chose and which reported."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from factlab.config import experiment_from_dict, load_experiment
from factlab.errors import FactlabError
from factlab.experiment.tune import check_tune, metric_value

P = lambda i, k, pr, t, d: json.dumps({"id": i, "kind": k, "prompt": pr, "target": t, "distractors": d}) + "\n"  # noqa: E731


def project(tmp_path: Path, model: str = "m", **tune) -> Path:
    (tmp_path / "docs.txt").write_text("Marta Ilvane runs the press line. Jonas Perl leads the night shift.\n")
    (tmp_path / "select.jsonl").write_text(P("s1", "paraphrase", "The one who runs the press line is", "Marta Ilvane", ["Jonas Perl"])
                                           + P("s2", "paraphrase", "The night shift is led by", "Jonas Perl", ["Marta Ilvane"]))
    (tmp_path / "report.jsonl").write_text(P("r1", "paraphrase", "The press line is run by", "Marta Ilvane", ["Jonas Perl"])
                                           + P("l1", "locality", "The quick brown fox", "jumps", ["sleeps"]))
    exp = {
        "name": "st", "model": model, "output_dir": str(tmp_path / "runs"), "data": {"corpus": "docs.txt"},
        # two stages: a trial can be pruned after the first (the second then never trains)
        "stages": [{"kind": "cpt", "peft": {"targets": ["all"], "r": 2},
                    "train": {"max_steps": 2, "batch_size": 2, "seq_len": 8, "bf16": False}},
                   {"kind": "cpt", "peft": {"targets": ["mlp"], "r": 2},
                    "train": {"lr": 1e-9, "max_steps": 1, "batch_size": 2, "seq_len": 8, "bf16": False}}],
        "eval": {"probes": "report.jsonl", "sampling": {"n": 0}},
        "tune": {"space": {"stages.0.train.lr": {"type": "float", "low": 1e-9, "high": 100, "log": True},
                           "stages.0.peft.method": {"type": "categorical", "choices": ["lora", "full"]},
                           "stages.0.train.max_steps": {"type": "int", "low": 2, "high": 100}},
                 "objectives": [{"metric": "damage", "direction": "minimize"},
                                {"metric": "paraphrase.accuracy", "direction": "maximize"}],
                 "trials": 3, "select_probes": "select.jsonl", **tune},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    return tmp_path / "exp.yaml"


@pytest.mark.parametrize("change, message", [
    ({"trials": None}, "tune needs a budget"),
    ({"select_probes": "report.jsonl"}, "must be different files"),
    ({"select_probes": "copy.jsonl"}, "must be different files"),  # same contents under another name
    ({"objectives": [{"metric": "reverse.accuracy"}]}, "needs reverse probes"),
    ({"objectives": [{"metric": "paraphrase.acc"}]}, "unknown metric 'paraphrase.acc'"),
    ({"space": {"stages.0.peft.r": {"type": "int", "low": 0, "high": 4}}}, "stages.0.peft.r"),
    ({"space": {"stages.0.train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, "log: true needs low > 0"),
    ({"enqueue": [{"stages.0.train.epochs": 2}]}, "not in tune.space"),
])
def test_bad_tune_blocks_are_one_line_errors(tmp_path, change, message):
    path = project(tmp_path, **change)
    (tmp_path / "copy.jsonl").write_bytes((tmp_path / "report.jsonl").read_bytes())
    with pytest.raises(FactlabError) as e:
        check_tune(load_experiment(path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_objective_metrics_come_from_the_rows_given_and_from_the_recorded_damage():
    from factlab.evaluate.perplexity import forgetting_summary

    ppl = lambda v: {"nll_per_token": math.log(v), "perplexity": v, "n_tokens": 100}  # noqa: E731
    forgetting = forgetting_summary({"perplexity": {"g": ppl(10.0)}}, {"perplexity": {"g": ppl(12.0)}})
    results = {"forgetting": {"cpt": forgetting}}
    assert metric_value("damage", [], results, "cpt") == pytest.approx(0.2)
    assert metric_value("damage", [], results, "sft") is None  # no such stage recorded
    row = lambda i, ok: {"id": i, "kind": "paraphrase", "correct": ok, "greedy_match": False, "target_logprob": -1.0,  # noqa: E731
                         "target_mean_logprob": -1.0, "rank": 1 if ok else 2}
    assert metric_value("paraphrase.accuracy", [row("a", True), row("b", False), row("c", False)], results, "cpt") == pytest.approx(1 / 3)
    assert metric_value("reverse.accuracy", [row("a", True)], results, "cpt") is None


@pytest.mark.parametrize("change, message", [({"model": "no-such-model"}, "neither an alias nor an existing folder"),
                                             ({"data": {"corpus": "missing.txt"}}, "missing.txt does not exist")])
def test_missing_model_or_data_fail_before_the_study_is_created(tmp_path, change, message):
    from factlab.experiment.store import RunStore
    from factlab.experiment.tune import run_tune

    path = project(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw.update(change)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(FactlabError, match=message):
        run_tune(load_experiment(path), RunStore(tmp_path / "runs" / "factlab.db"))
    assert not (tmp_path / "runs").exists()  # no study storage, no store, no run folder


def test_a_file_without_tune_block_is_refused():
    with pytest.raises(FactlabError, match="no tune: block"):
        check_tune(experiment_from_dict({"name": "x", "model": "m"}))


def factlab(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "factlab", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def store_rows(db: Path) -> dict[str, tuple]:
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return {Path(r[0]).name: (r[1], r[2]) for r in c.execute("SELECT run_dir, status, started FROM runs")}
    except sqlite3.OperationalError:
        return {}


def test_study_prunes_resumes_after_sigkill_and_reports_the_front(tmp_path, tiny_dir, monkeypatch, capsys):
    import optuna
    from cli_helpers import kill_when, run_cli
    from optuna.trial import TrialState

    exp = project(tmp_path, model=str(tiny_dir), prune_threshold=0.5, enqueue=[
        {"stages.0.train.lr": 1e-9, "stages.0.peft.method": "lora", "stages.0.train.max_steps": 2},
        {"stages.0.train.lr": 1e-9, "stages.0.peft.method": "lora", "stages.0.train.max_steps": 20},  # killed inside it
        {"stages.0.train.lr": 50.0, "stages.0.peft.method": "full", "stages.0.train.max_steps": 2},  # wrecks the model
    ])
    db = tmp_path / "runs" / "factlab.db"

    def trial_1_running() -> bool:
        rows = store_rows(db)
        return rows.get("trial-000", ("",))[0] == "done" and rows.get("trial-001", ("",))[0] == "running"

    kill_when(factlab("tune", exp), trial_1_running, "trial 1 ran after trial 0")
    before = store_rows(db)
    assert before["trial-000"][0] == "done" and before["trial-001"][0] == "running"
    url = f"sqlite:///{tmp_path / 'runs' / 'st-optuna.db'}"
    first = optuna.load_study(study_name="st", storage=url).trials[0]
    assert first.state == TrialState.COMPLETE

    # The resume: the same command, in this process (the interpreter is not what it tests).
    code, out, err = run_cli(monkeypatch, capsys, "tune", exp)
    assert code == 0, err[-3000:]
    study = optuna.load_study(study_name="st", storage=url)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    again = study.trials[0]
    assert again.datetime_complete == first.datetime_complete and again.values == first.values  # not repeated
    assert study.trials[3].user_attrs["retry_of"] == 1 and study.trials[3].params == study.trials[1].params
    after = store_rows(db)
    assert after["trial-000"] == before["trial-000"]  # the finished trial's run was not redone
    assert after["trial-001"][0] == "failed" and after["trial-002"][0] == "pruned" and after["trial-003"][0] == "done"
    with sqlite3.connect(db) as c:
        point = json.loads(c.execute("SELECT point FROM runs WHERE run_dir LIKE '%trial-002'").fetchone()[0])
    assert point == {"trial": 2, "stages.0.train.lr": 50.0, "stages.0.peft.method": "full", "stages.0.train.max_steps": 2}
    assert "Pareto front" in out and "interrupted" in err

    # the report: front, trials, importances, and which probe files chose and which reported
    code, _, err = run_cli(monkeypatch, capsys, "report", "st", "--store", db, "-o", tmp_path / "r.md", "--format", "md")
    assert code == 0, err[-2000:]
    md = (tmp_path / "r.md").read_text()
    assert "| chose the recipe (tune.select_probes) | select.jsonl |" in md
    assert "| reported it (eval.probes) | report.jsonl |" in md
    front = md.split("## Pareto front of st\n")[1].split("\n## ")[0]
    numbers = {line.split("|")[1].strip() for line in front.splitlines() if line.startswith("| ") and not line.startswith("| trial")}
    assert numbers == {str(t.number) for t in study.best_trials} and numbers <= {"0", "3"}
    assert "pruned at stage 1" in md and "Which settings mattered" in md
    pruned = json.loads((tmp_path / "runs" / "st" / "trial-002" / "results.json").read_text())
    assert list(pruned["summaries"]) == ["base", "cpt1"]  # stopped before the second stage


def test_the_objective_runs_a_trial_with_typed_options_and_the_study_s_events(tmp_path):
    """TrialObjective (the objective Optuna calls) on its own, with a run that only writes a
    results.json: the run gets the trial's experiment and RunOptions, the events it gets call
    the study's on_stage (the caller's presentation) and leave the study's own untouched, the
    values land in the trial's user attributes, and an objective the selection probes cannot
    give fails the trial by name."""
    import optuna

    from factlab.experiment.events import TuneEvents
    from factlab.experiment.run_folder import EvalRecord, RunFolder, RunResults, StageRecord
    from factlab.experiment.store import RunStore
    from factlab.experiment.tune import TrialObjective

    exp = load_experiment(project(tmp_path))
    names = exp.stage_names()
    shown, seen = [], {}

    def run(texp, options, events):
        seen.update(lr=texp.stages[0].train.lr, options=options, events=events)
        folder = RunFolder(options.run_dir)
        folder.path.mkdir(parents=True)
        results = RunResults(name=texp.name)
        results.add(EvalRecord(names[-1], forgetting={"damage": 0.25}))
        folder.write_results(results)
        for name in names:
            events.stage_done(folder, StageRecord(name, name))
        return folder.path

    study_events = TuneEvents(on_stage=lambda folder, stage: shown.append(stage.name))
    objective = TrialObjective(exp, RunStore(tmp_path / "runs" / "factlab.db"), "st", study_events, run,
                               sel_ids={"s1", "s2"}, rep_ids={"r1", "l1"}, prune_ids={"s1", "s2"},
                               prune_metric="damage")
    study = optuna.create_study(directions=["minimize", "maximize"])
    trial = study.ask()
    with pytest.raises(FactlabError, match=r"trial 0: paraphrase.accuracy could not be computed on the selection probes"):
        objective(trial)
    options = seen["options"]
    assert options.run_dir == tmp_path / "runs" / "st" / "trial-000" and options.sweep == "st"
    assert options.point == {"trial": 0, **trial.params} and options.label.startswith("trial 0: ")
    assert options.cache is objective.cache and seen["lr"] == trial.params["stages.0.train.lr"]
    assert shown == names  # the caller's on_stage saw every stage
    assert seen["events"] is not study_events and study_events.on_stage is not seen["events"].on_stage
    assert trial.user_attrs["select"] == {"damage": 0.25, "paraphrase.accuracy": None}
    assert trial.user_attrs["run_dir"] == str(options.run_dir)


def test_ctrl_c_inside_a_trial_is_one_line_and_leaves_no_trial_folder(tmp_path, tiny_dir):
    """SIGINT while trial 0 runs (held after its first stage by tests/tune_worker.py until the
    test acts: no sleep decides when): exit 130, the one `interrupted; ...` line and no
    Optuna traceback, no trial-000 folder (no half-written config.yaml), its run marked failed
    and its parameters queued again for the resume; Optuna recorded the trial as failed."""
    import signal
    import time

    import optuna
    from optuna.trial import TrialState

    exp = project(tmp_path, model=str(tiny_dir), space={"stages.0.train.lr": {"type": "float", "low": 1e-6, "high": 1e-4,
                                                                           "log": True}}, trials=1)
    gate = tmp_path / "gate"
    gate.mkdir()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("tune_worker.py")), str(gate), "tune", str(exp)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    end = time.monotonic() + 600  # a bound against a hung process only
    while not any(gate.glob("at-0-*")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < end, "trial 0 did not reach its first stage"
        time.sleep(0.02)
    trial_dir = tmp_path / "runs" / "st" / "trial-000"
    assert (trial_dir / "config.yaml").is_file()  # the trial is really under way
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1].startswith("interrupted; ") and sum(x.startswith("interrupted") for x in lines) == 1, err[-3000:]
    for noise in ("Traceback", "KeyboardInterrupt", "failed with parameters", "error:"):
        assert noise not in err, (noise, err[-3000:])
    assert not trial_dir.exists()
    assert store_rows(tmp_path / "runs" / "factlab.db")["trial-000"][0] == "failed"
    study = optuna.load_study(study_name="st", storage=f"sqlite:///{tmp_path / 'runs' / 'st-optuna.db'}")
    first, retry = study.trials
    assert first.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.system_attrs["fixed_params"] == first.params and retry.user_attrs["retry_of"] == 0
