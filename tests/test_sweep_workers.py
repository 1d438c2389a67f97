"""`factlab sweep --workers N`: points in parallel processes with their share of the threads,
the same results as one after another, a run store that takes concurrent writers, and a killed
parallel sweep that resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from factlab.experiment import sweep as sweep_mod
from factlab.experiment.store import RunStore
from factlab.experiment.sweep import worker_plan
from test_sweep import db_rows, factlab, sweep_project


def test_worker_plan_never_asks_for_more_threads_than_cpus():
    assert worker_plan(2, 2) == (2, 1)
    assert worker_plan(4, 2) == (2, 1)  # one process per CPU at most
    assert worker_plan(2, 8) == (2, 4)
    assert worker_plan(3, 8) == (3, 2)
    assert worker_plan(1, 8) == (1, 8)
    assert worker_plan(5, 1) == (1, 1)
    for workers in range(1, 10):
        for cpus in range(1, 17):
            n, t = worker_plan(workers, cpus)
            assert 1 <= n <= workers and t >= 1 and n * t <= cpus


def mark_stage(folder, stage) -> None:
    """on_stage of the parallel test: runs in a worker (so it must be a module-level function)."""
    (folder.path / f"on_stage-{stage.name}.txt").write_text(str(os.getpid()))


def test_two_workers_give_what_one_after_another_gives(tmp_path, tiny_dir, monkeypatch):
    from factlab.config import load_experiment
    from factlab.experiment.events import SweepEvents
    from factlab.experiment.sweep import SweepOptions, run_sweep

    monkeypatch.setattr(sweep_mod, "available_cpus", lambda: 2)  # 2 processes of 1 thread, as this test runs
    exp_path = sweep_project(tmp_path, tiny_dir)
    done = []
    par = run_sweep(load_experiment(exp_path, [f"output_dir={tmp_path / 'par'}"]), RunStore(tmp_path / "par.db"),
                    SweepOptions(workers=2),
                    SweepEvents(on_stage=mark_stage, on_done=lambda folder, results, run_id: done.append(folder.path)))
    # One after another with the workers' thread count: the thread count changes the order of
    # float sums, and the comparison below is exact.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = run_sweep(load_experiment(exp_path, [f"output_dir={tmp_path / 'seq'}"]), RunStore(tmp_path / "seq.db"))
    finally:
        torch.set_num_threads(threads)

    assert len(par) == len(seq) == 3 and sorted(done) == sorted(par)  # on_done: in this process, once per point
    for a, b in zip(par, seq):
        assert a.name == b.name
        ra, rb = (json.loads((f / "results.json").read_text()) for f in (a, b))
        assert ra["summaries"] == rb["summaries"] and ra["perplexity"] == rb["perplexity"]
        assert [s["final_loss"] for s in ra["stages"]] == [s["final_loss"] for s in rb["stages"]]
        assert (a / "scores" / "cpt.jsonl").read_text() == (b / "scores" / "cpt.jsonl").read_text()
        assert (a / "on_stage-cpt.txt").read_text() != str(os.getpid())  # on_stage ran in a worker
    rows = RunStore(tmp_path / "par.db").runs()
    assert [r["status"] for r in rows] == ["done"] * 3
    # The points ran in worker processes, at most two. Which worker takes which point, and
    # whether two points overlap in time, depends on how fast each worker starts (a spawned
    # process imports torch): timing, not asserted here; bench/bench_sweep_workers.py measures
    # the parallel speed-up.
    pids = {(f / "on_stage-cpt.txt").read_text() for f in par}
    assert 1 <= len(pids) <= 2 and str(os.getpid()) not in pids
    logs = sorted((tmp_path / "par" / "sw" / "logs").iterdir())
    assert [p.name for p in logs] == [f"{f.name}.log" for f in par] and all("evaluated cpt" in p.read_text() for p in logs)


def test_the_store_takes_concurrent_writers(tmp_path):
    """Three processes starting and finishing runs in one new store at once: nothing lost, no
    'database is locked', the schema created once."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from factlab.experiment.store import RunStore
        store, me = RunStore({str(tmp_path / 'db.sqlite')!r}), sys.argv[1]
        results = {{"summaries": {{"base": {{"recall": {{"accuracy": {{"n": 2, "k": 1, "rate": 0.5}}}}}}}},
                    "stages": [{{"name": "cpt", "final_loss": 1.0, "tokens_per_second": 10.0}}]}}
        for i in range(15):
            run = Path(f"/runs/{{me}}-{{i}}")
            store.start(run, "x", {{"name": "x", "i": i, "me": me}}, sweep="s")
            store.finish(run, results)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k)], env=env, stderr=subprocess.PIPE, text=True)
             for k in range(3)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    store = RunStore(tmp_path / "db.sqlite")
    rows = store.runs()
    assert len(rows) == 45 and {r["status"] for r in rows} == {"done"}
    assert {len(store.metrics(r["run_dir"])) for r in rows} == {3}  # accuracy, final_loss, tokens_per_second


def test_a_store_file_another_writer_has_just_created_gets_its_tables(tmp_path):
    """The race of two first writers: one finds the file the other created an instant ago,
    still empty; it must create the tables, not fail with 'no such table'."""
    (tmp_path / "db.sqlite").touch()
    store = RunStore(tmp_path / "db.sqlite")
    store.start(tmp_path / "r", "x", {"name": "x"})
    assert [r["status"] for r in store.runs()] == ["running"]


def test_a_killed_parallel_sweep_leaves_no_worker_behind_and_resumes(tmp_path, tiny_dir, monkeypatch, capsys):
    import psutil
    from cli_helpers import kill_when, run_cli

    exp = sweep_project(tmp_path, tiny_dir, steps=300)
    db = tmp_path / "runs" / "factlab.db"
    proc = factlab("sweep", exp, "--workers", "2")
    workers: list = []

    def two_points_training() -> bool:
        running = [r for r in db_rows(db) if r[1] == "running"]
        if len(running) == 2 and all((Path(r[0]) / "stages" / "1-cpt.partial").is_dir() for r in running):
            workers[:] = psutil.Process(proc.pid).children(recursive=True)
            return True
        return False

    kill_when(proc, two_points_training, "two points trained at once")
    assert workers
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"workers outlived their sweep: {alive}"
    before = db_rows(db)
    # Killed inside two trainings of 300 steps each; a worker notices its parent is gone within
    # a second (exit_with_parent) and one that finished its point in that second is kept as done.
    interrupted = [r for r in before if r[1] == "running"]
    assert interrupted and all(r[1] in ("running", "done") for r in before) and len(before) == 2

    # The resume: the same command in this process (its two workers are spawned processes again).
    code, _, err = run_cli(monkeypatch, capsys, "sweep", exp, "--workers", "2")
    assert code == 0, err[-2000:]
    after = db_rows(db)
    assert [r[1] for r in after] == ["done"] * 3
    restarted = {r[0]: r[2] for r in after}
    for run_dir, status, started in before:
        if status == "running":
            assert restarted[run_dir] > started  # the interrupted points were redone
        else:
            assert restarted[run_dir] == started  # a finished one was not
        assert list(json.loads((Path(run_dir) / "results.json").read_text())["summaries"]) == ["base", "cpt"]
        assert not list(Path(run_dir).rglob("*.partial"))


def test_workers_must_be_at_least_one(tmp_path, tiny_dir, monkeypatch, capsys):
    from cli_helpers import run_cli

    code, _, err = run_cli(monkeypatch, capsys, "sweep", sweep_project(tmp_path, tiny_dir), "--workers", "0")
    assert code == 2 and "--workers 0 is out of range" in err
