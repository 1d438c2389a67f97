"""The run store: an embedded SQLite database indexing every run and its metrics.

Each run keeps its own folder (the source of truth: config.yaml, results.json, scores/); the
store indexes them so that sweeps can resume and runs can be listed, filtered and compared
without opening every folder. SQLite gives atomic transactions for free: a run's status moves
from `running` to `done` (with its metrics) in one commit, so a sweep killed with SIGKILL leaves
either a finished run or one marked `running`, which the next start redoes.

Several processes may write at once (`factlab sweep --workers N`): every write is one short
transaction, and a writer that finds the database locked waits for it (up to 30 s).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from factlab.experiment.run_folder import RunFolder, RunResults

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_dir      TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    sweep        TEXT,
    point        TEXT,            -- JSON: the sweep overrides of this run
    label        TEXT,            -- the overrides as a short text, e.g. "cpt.alpha=32"
    config_hash  TEXT NOT NULL,
    config       TEXT NOT NULL,   -- JSON: the resolved experiment
    status       TEXT NOT NULL,   -- running | done | failed | pruned
    error        TEXT,
    started      REAL NOT NULL,
    finished     REAL,
    seconds      REAL,
    tokens_per_s REAL,
    peak_rss_mb  REAL
);
CREATE INDEX IF NOT EXISTS runs_sweep ON runs (sweep, config_hash);
CREATE TABLE IF NOT EXISTS metrics (
    run_dir  TEXT NOT NULL REFERENCES runs (run_dir) ON DELETE CASCADE,
    stage    TEXT NOT NULL,     -- base, base+context, or a stage name
    kind     TEXT NOT NULL,     -- probe kind, "all", or "forgetting" / "style" / "priming" / "priming_leaked"
    metric   TEXT NOT NULL,
    value    REAL,
    ci_low   REAL,
    ci_high  REAL,
    n        INTEGER,
    PRIMARY KEY (run_dir, stage, kind, metric)
);
"""


def config_hash(config: dict) -> str:
    """A stable hash of a resolved config and of the contents of the data files it names,
    ignoring where its output goes: a sweep point whose corpus, Q&A or probe file was edited
    since it finished is not "finished" any more. `device: auto` (where it runs, when the
    machine decides) is left out too; an explicit device is part of the point."""
    c = {k: v for k, v in config.items() if k not in ("output_dir", "sweep")}
    if c.get("device") == "auto":  # the default: hashes stay those of configs written before `device` existed
        del c["device"]
    h = hashlib.sha256(json.dumps(c, sort_keys=True).encode())
    for path in sorted(_input_paths({k: v for k, v in c.items() if k != "model"})):  # a model folder is weights: by name only
        p = Path(path)
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(str(f.relative_to(p) if p.is_dir() else f).encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def _input_paths(x) -> set[str]:
    """Every string in a resolved config that names an existing file or folder (data paths
    are made absolute when the experiment is loaded)."""
    if isinstance(x, dict):
        return set().union(*(_input_paths(v) for v in x.values())) if x else set()
    if isinstance(x, list):
        return set().union(*(_input_paths(v) for v in x)) if x else set()
    if isinstance(x, str) and Path(x).is_absolute() and Path(x).exists():
        return {x}
    return set()


def flatten_metrics(results: RunResults | dict) -> list[tuple]:
    """(stage, kind, metric, value, ci_low, ci_high, n) rows from a run's results (records, or
    results.json's content).

    Priming (evaluate.priming): per evaluation `priming/rate` (share of answers with a trained
    name, raw: the base model's is the figure's `before`); per stage `forgetting/priming` (the
    figure: answers with a name the base answer did not have), `forgetting/priming_locality`
    and `forgetting/priming_general`, and `priming_leaked/<name>` = how many answers leaked it."""
    results = RunResults.coerce(results)
    rows: list[tuple] = []

    def add(stage, kind, metric, x):
        if isinstance(x, dict) and ("rate" in x or "mean" in x):
            v = x.get("rate", x.get("mean"))
            rows.append((stage, kind, metric, v, x.get("ci_low"), x.get("ci_high"), x.get("n")))
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            rows.append((stage, kind, metric, float(x), None, None, None))

    for stage, kinds in results.summaries.items():
        for kind, summary in kinds.items():
            for metric, x in summary.items():
                add(stage, kind, metric, x)
    for stage, texts in results.perplexity.items():
        for name, p in texts.items():
            add(stage, "perplexity", name, p.get("perplexity"))
    for stage, f in results.forgetting.items():
        for name, p in (f.get("perplexity") or {}).items():
            add(stage, "forgetting", f"ppl_ratio:{name}", p.get("perplexity_ratio"))
        loc = f.get("locality") or {}
        add(stage, "forgetting", "locality_delta", loc.get("delta"))
        add(stage, "forgetting", "locality_greedy_delta", (f.get("locality_greedy") or {}).get("delta"))
        add(stage, "forgetting", "damage", f.get("damage"))
        pr = f.get("priming") or {}
        add(stage, "forgetting", "priming", pr.get("after"))
        for where in ("locality", "general"):
            add(stage, "forgetting", f"priming_{where}", pr.get(where))
        for name, count in (pr.get("leaked") or {}).items():
            add(stage, "priming_leaked", name, count)
    for stage, pr in results.priming.items():
        add(stage, "priming", "rate", pr.get("rate"))
    for stage, st in results.style.items():
        for metric, x in st.items():
            add(stage, "style", metric, x)
    for st in results.stages:
        for metric in ("final_loss", "eval_loss", "train_loss_after", "tokens_per_second", "seconds", "trainable_params", "trainable_share",
                       "artifact_bytes", "peak_rss_mb", "train_peak_rss_mb", "steps", "l2_to_base_final",
                       "update_norm_capped_steps"):
            add(st.name, "train", metric, st.get(metric))
        add(st.name, "train", "seconds_per_fact", (st.get("edit") or {}).get("seconds_per_fact"))  # kind: edit
        if "merged" in st.metrics:  # prompt methods are evaluated as base + adapter: 0 here
            add(st.name, "train", "merged", float(st.merged))
    return rows


class RunStore:
    """A thin layer over one SQLite file (created on first use)."""

    def __init__(self, path: str | Path):
        # Nothing is created until the first write: a command that fails on bad input must
        # leave no trace, and listing an empty store must not make one.
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        # Created on first use. Checked on the tables, not on the file: with several writers
        # (sweep workers) one may find the file that another has just created and not yet
        # filled; CREATE ... IF NOT EXISTS under SQLite's lock makes the second a no-op.
        if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='metrics'").fetchone() is None:
            db.executescript(SCHEMA)
        db.execute("PRAGMA foreign_keys = ON")
        db.row_factory = sqlite3.Row
        return db

    def ensure(self) -> None:
        """Create the database now if it does not exist yet."""
        with closing(self._connect()):
            pass

    def start(self, run_dir: Path, name: str, config: dict, sweep: str | None = None, point: dict | None = None,
              label: str | None = None) -> None:
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR REPLACE INTO runs (run_dir, name, sweep, point, label, config_hash, config, status, started) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                (str(run_dir), name, sweep, json.dumps(point or {}), label, config_hash(config), json.dumps(config), time.time()),
            )
            db.execute("DELETE FROM metrics WHERE run_dir = ?", (str(run_dir),))

    def finish(self, run_dir: Path, results: RunResults | dict) -> None:
        """Mark a run done and index its metrics, in one transaction."""
        results = RunResults.coerce(results)
        stages = results.stages
        tps = [s.get("tokens_per_second") for s in stages if s.get("tokens_per_second")]
        with closing(self._connect()) as db, db:
            started = db.execute("SELECT started FROM runs WHERE run_dir = ?", (str(run_dir),)).fetchone()["started"]
            now = time.time()
            db.execute(
                "UPDATE runs SET status='done', finished=?, seconds=?, tokens_per_s=?, peak_rss_mb=?, error=NULL WHERE run_dir=?",
                (now, now - started, sum(tps) / len(tps) if tps else None,
                 max((s.get("peak_rss_mb") or 0 for s in stages), default=None), str(run_dir)),
            )
            db.executemany(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(str(run_dir), *row) for row in flatten_metrics(results)],
            )

    def fail(self, run_dir: Path, error: str) -> None:
        with closing(self._connect()) as db, db:
            db.execute("UPDATE runs SET status='failed', finished=?, error=? WHERE run_dir=?", (time.time(), error[:500], str(run_dir)))

    def mark(self, run_dir: Path, status: str, note: str | None = None) -> None:
        """Set a run's status, e.g. `pruned` (a tune trial stopped early) or `failed` (a run
        left `running` by a killed process)."""
        with closing(self._connect()) as db, db:
            db.execute("UPDATE runs SET status=?, finished=?, error=? WHERE run_dir=?", (status, time.time(), note, str(run_dir)))

    def done_point(self, sweep: str, cfg_hash: str) -> str | None:
        """The run folder of a finished run of this sweep point, if any (and still on disk)."""
        if not self.path.exists():
            return None
        with closing(self._connect()) as db:
            for row in db.execute("SELECT run_dir FROM runs WHERE sweep=? AND config_hash=? AND status='done'", (sweep, cfg_hash)):
                if RunFolder.is_run(row["run_dir"]):
                    return row["run_dir"]
        return None

    def runs(self, name: str | None = None, sweep: str | None = None, status: str | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        query, args = "SELECT * FROM runs WHERE 1=1", []
        for col, val in (("name", name), ("sweep", sweep), ("status", status)):
            if val is not None:
                query += f" AND {col} = ?"
                args.append(val)
        with closing(self._connect()) as db:
            return [dict(r) for r in db.execute(query + " ORDER BY started", args)]

    def metrics(self, run_dir: str) -> list[dict]:
        with closing(self._connect()) as db:
            return [dict(r) for r in db.execute("SELECT * FROM metrics WHERE run_dir=? ORDER BY stage, kind, metric", (str(run_dir),))]
