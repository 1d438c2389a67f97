"""`factlab tune --storage URL`: several workers share one Optuna study in a database.

Against a real PostgreSQL server the test starts itself (Debian's `postgresql` package: initdb
and pg_ctl; skipped, with the reason, where there is none): two workers on one study, one
SIGKILLed in the middle of a trial; its trial is failed and retried by the other worker, every
finished trial is counted once, and the report is built from the storage alone. A SQLite URL
runs the same code in one process; bad URLs are one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from glob import glob
from pathlib import Path

import pytest
import yaml

from cli_helpers import run_cli
from test_tune import project

WORKER = Path(__file__).with_name("tune_worker.py")
SPACE = {"stages.0.train.lr": {"type": "float", "low": 1e-6, "high": 1e-4, "log": True}}  # no trial wrecks the model
LIMIT = 600  # overall bound on each wait, seconds: generous, never the thing a test measures


def shared_project(tmp_path: Path, tiny_dir: Path, trials: int) -> Path:
    # prune on (threshold never reached), so that a lost trial's shadow pruning trial is handled too
    return project(tmp_path, model=str(tiny_dir), space=SPACE, trials=trials, prune_threshold=1e9)


# --- a throw-away PostgreSQL server --------------------------------------------------------


def _pg_bin(name: str) -> str | None:
    found = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def postgres_url():
    """A PostgreSQL server in a temporary data folder on a free localhost port, with an empty
    database `factlab`; stopped and removed afterwards. initdb refuses to run as root: as
    root the server runs as the `postgres` system user (runuser)."""
    pytest.importorskip("psycopg", reason="psycopg 3, SQLAlchemy's postgresql:// driver (psycopg[binary] in requirements.txt), is not installed")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl); install Debian's postgresql package")
    prefix: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as (initdb refuses root)")
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser to start the server as the postgres user")
        prefix = ["runuser", "-u", "postgres", "--"]
    home = Path(tempfile.mkdtemp(prefix="factlab-pg-"))
    if prefix:
        os.chown(home, user.pw_uid, user.pw_gid)
    data, port = home / "data", _free_port()
    run = lambda *cmd: subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=LIMIT)  # noqa: E731
    try:
        r = run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        if r.returncode != 0:
            pytest.skip(f"initdb could not make a data folder: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        r = run(pg_ctl, "-D", str(data), "-l", str(home / "log"), "-w", "-t", str(LIMIT), "start",
                "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off")
        if r.returncode != 0:
            log = (home / "log").read_text() if (home / "log").exists() else r.stderr
            pytest.skip(f"the PostgreSQL server did not start: {(log.strip().splitlines() or ['?'])[-1]}")
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE factlab")  # outside a transaction, hence autocommit
        yield f"postgresql://postgres@127.0.0.1:{port}/factlab"
    finally:
        if (data / "postmaster.pid").exists():
            run(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture()
def start_worker():
    """start_worker(GATE, *factlab args, cwd=...): a tune_worker.py process; any still alive
    when the test ends (it failed half-way) is killed, by its own id."""
    started: list[subprocess.Popen] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))

    def start(gate: Path, *args, cwd: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, str(WORKER), str(gate), *map(str, args)], env=env, cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def wait_for(what: str, ready, procs=()) -> None:
    """Poll `ready()` (files, the storage) until it holds; fail at once if a worker ended."""
    end = time.monotonic() + LIMIT
    while not ready():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"waiting for {what}: a worker ended ({p.returncode}): " + p.stderr.read()[-2000:])
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {LIMIT} s")
        time.sleep(0.05)


def at(gate: Path, number: int, proc: subprocess.Popen) -> bool:
    return (gate / f"at-{number}-{proc.pid}").exists()


def report_md(tmp_path: Path, name: str, storage: str, monkeypatch, capsys) -> str:
    """`factlab report NAME --storage URL` from a folder without any run store: the storage alone."""
    away = tmp_path / "elsewhere"
    away.mkdir(exist_ok=True)
    monkeypatch.chdir(away)
    code, _, err = run_cli(monkeypatch, capsys, "report", name, "--storage", storage, "-o", "r.md", "--format", "md")
    assert code == 0, err[-2000:]
    assert not (away / "runs").exists()
    return (away / "r.md").read_text()


def front_numbers(md: str, name: str) -> set[str]:
    front = md.split(f"## Pareto front of {name}\n")[1].split("\n## ")[0]
    return {line.split("|")[1].strip() for line in front.splitlines() if line.startswith("| ") and not line.startswith("| trial")}


# --- tests --------------------------------------------------------------------------------


def test_two_workers_share_a_postgresql_study_and_a_killed_workers_trial_is_retried(tmp_path, tiny_dir, postgres_url, start_worker,
                                                                                    monkeypatch, capsys):
    import optuna
    from optuna.trial import TrialState

    exp = shared_project(tmp_path, tiny_dir, trials=3)
    gate = tmp_path / "gate"
    gate.mkdir()
    # heartbeats every 2 s: a live worker's trial stays fresh even on a loaded machine (stale after 4 s)
    common = ("tune", exp, "--storage", postgres_url, "--heartbeat", "2")
    a = start_worker(gate, *common, "-o", tmp_path / "a", cwd=tmp_path)  # "machine" A: its own output folder
    wait_for("worker A in trial 0", lambda: at(gate, 0, a), [a])
    b = start_worker(gate, *common, "-o", tmp_path / "b", cwd=tmp_path)  # "machine" B
    wait_for("worker B in trial 1", lambda: at(gate, 1, b), [a, b])

    study = optuna.load_study(study_name="st", storage=postgres_url)
    running = {t.number: t for t in study.get_trials(states=(TrialState.RUNNING,))}
    assert set(running) == {0, 1} and running[1].user_attrs["worker"].endswith(f":{b.pid}")
    lost_params = running[1].params
    b.send_signal(signal.SIGKILL)  # in the middle of trial 1: its first stage trained, its second not
    b.wait()
    # Trial 1 is stale two heartbeats (4 s) after B's last one; wait that long (a lower bound,
    # not a deadline) so that A's next trial finds it stale.
    time.sleep(5)
    for n in range(6):
        (gate / f"go-{n}").touch()  # every trial may now finish
    out, err = a.communicate(timeout=LIMIT)
    assert a.returncode == 0, err[-3000:]
    assert "trial 1 (on " in err and "lost its worker" in err

    study = optuna.load_study(study_name="st", storage=postgres_url)
    trials = study.trials
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE], states
    retry = trials[2]
    assert retry.system_attrs["failed_trial"] == 1 and retry.params == lost_params  # the lost trial, run again
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3  # the budget: every finished trial counted once, none twice
    assert {Path(t.user_attrs["run_dir"]).name for t in done} == {"trial-000", "trial-002", "trial-003"}
    for t in done:  # each complete trial: its run folder (on A) and its metrics in the storage
        assert t.user_attrs["worker"].endswith(f":{a.pid}") and t.user_attrs["host"] == socket.gethostname()
        assert Path(t.user_attrs["run_dir"]).parent == tmp_path / "a" / "st"
        assert json.loads((Path(t.user_attrs["run_dir"]) / "results.json").read_text())["summaries"]
        assert set(t.user_attrs["select"]) == {"damage", "paraphrase.accuracy"}
        assert t.user_attrs["select"]["damage"] == pytest.approx(t.values[0])
    assert trials[1].user_attrs["worker"].endswith(f":{b.pid}")
    assert not (tmp_path / "a" / "st" / "trial-001").exists()  # B's run folder is on B
    assert (tmp_path / "b" / "st" / "trial-001").is_dir()
    shadows = optuna.load_study(study_name="st:prune", storage=postgres_url).trials
    assert [t.state for t in shadows].count(TrialState.RUNNING) == 0  # the lost trial's shadow failed too
    assert "Pareto front" in out

    # B's machine again: the study's budget is taken; its store learns that trial 1 failed
    from factlab.experiment.store import RunStore

    assert {Path(r["run_dir"]).name: r["status"] for r in RunStore(tmp_path / "b" / "factlab.db").runs()} == {"trial-001": "running"}
    code, _, err2 = run_cli(monkeypatch, capsys, *common, "-o", tmp_path / "b")  # in this process: no second start-up
    assert code == 0, err2[-3000:]
    assert "already has 3 finished trials" in err2
    assert {Path(r["run_dir"]).name: r["status"] for r in RunStore(tmp_path / "b" / "factlab.db").runs()} == {"trial-001": "failed"}
    assert len(optuna.load_study(study_name="st", storage=postgres_url).trials) == 4  # nothing new

    md = report_md(tmp_path, "st", postgres_url, monkeypatch, capsys)
    assert front_numbers(md, "st") == {str(t.number) for t in study.best_trials} <= {"0", "2", "3"}
    assert "3 complete, 0 pruned, 1 failed trials" in md and "complete (retry of 1)" in md


def test_a_sqlite_url_holds_a_named_study_and_its_report_and_refuses_another_search(tmp_path, tiny_dir, monkeypatch, capsys):
    import optuna
    from optuna.trial import TrialState

    exp = shared_project(tmp_path, tiny_dir, trials=1)
    url = f"sqlite:///{tmp_path / 'shared' / 'studies.db'}"  # its folder is made too
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code, out, err = run_cli(monkeypatch, capsys, "tune", exp, "--storage", url, "--study-name", "lr-search", "-o", tmp_path / "w")
    assert code == 0, err[-3000:]
    assert "Pareto front" in out and "--storage URL" in out
    study = optuna.load_study(study_name="lr-search", storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert {Path(t.user_attrs["run_dir"]).parent for t in study.trials} == {tmp_path / "w" / "lr-search"}
    assert {t.user_attrs["store"] for t in study.trials} == {str((tmp_path / "w" / "factlab.db").resolve())}
    assert not list((tmp_path / "w").glob("*-optuna.db"))  # not the default storage beside the store
    # a second invocation: the budget is taken, nothing runs again
    code, out, err = run_cli(monkeypatch, capsys, "tune", exp, "--storage", url, "--study-name", "lr-search", "-o", tmp_path / "w")
    assert code == 0 and "already has 1 finished trials" in err
    assert len(optuna.load_study(study_name="lr-search", storage=url).trials) == 1
    md = report_md(tmp_path, "lr-search", url, monkeypatch, capsys)
    assert front_numbers(md, "lr-search") == {str(t.number) for t in study.best_trials}
    assert "| chose the recipe (tune.select_probes) | select.jsonl |" in md
    # a worker whose tune: block searches another space may not join the study
    (tmp_path / "other").mkdir()
    other = project(tmp_path / "other", model=str(tiny_dir), trials=2,
                    space={"stages.0.train.lr": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True}})
    code, _, err = run_cli(monkeypatch, capsys, "tune", other, "--storage", url, "--study-name", "lr-search", "-o", tmp_path / "w")
    assert code == 2 and "was started with another tune.space" in err and "--study-name" in err
    assert len(optuna.load_study(study_name="lr-search", storage=url).trials) == 1


@pytest.mark.parametrize("url, message", [
    ("not a url", "is not a database URL"),
    ("redis://localhost/0", "redis is not a database Optuna stores studies in"),
    ("mysql+nosuchdriver://u@h/db", "SQLAlchemy has no driver"),
    ("postgresql://u:secret@127.0.0.1:1/db", "cannot open the study storage"),
])
def test_bad_storage_urls_are_one_line_errors(tmp_path, tiny_dir, monkeypatch, capsys, url, message):
    pytest.importorskip("psycopg")
    exp = shared_project(tmp_path, tiny_dir, trials=1)
    code, out, err = run_cli(monkeypatch, capsys, "tune", exp, "--storage", url, "-o", tmp_path / "w")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "secret" not in err  # the password is not echoed
    assert not (tmp_path / "w").exists()
