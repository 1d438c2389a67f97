"""`factlab tune`: find a recipe on the recall-versus-forgetting front with Optuna.

The experiment's `tune:` block (config.TuneSpec) declares a search space over dotted keys
(the same overrides as `--set`), objectives and a budget. Every trial is an ordinary run in
the run store (sweep name = study name; the point holds the trial number and its
parameters), so `factlab runs`, `compare` and `report` see trials like sweep points.

Why Optuna: multi-objective TPE / NSGA-II samplers, a resumable study storage, enqueued
trials, pruners, the Pareto front (`study.best_trials`) and parameter importances come with
it; none of them is re-written here. Two things are added around it:

- **Selection vs report probes.** A trial scores `tune.select_probes` and `eval.probes`
  (different files) in one evaluation; the objectives are computed only from the rows of the
  selection probes, and the same metrics on the report probes are stored beside them. So the
  recipe is chosen on one set and reported on another.
- **Pruning a multi-objective study.** Optuna's `Trial.report` / `should_prune` exist only
  for single-objective studies, so every trial has a shadow trial in a single-objective
  study `<study>:prune` (same storage) that receives the intermediate value (the prune
  metric on the selection probes after each stage) and asks a real Optuna pruner (median
  rule, or a threshold) whether to stop.

Resume: by default the study lives in `sqlite:///<store folder>/<study>-optuna.db`. A
restarted study keeps its finished (complete or pruned) trials; a trial left running by a
killed process is marked failed, its run too, and its parameters are enqueued again (what
Optuna's RetryHeartbeatStaleTrialCallback does for heartbeat storages). One process per study
at a time.

Several workers (`--storage URL`): any SQLAlchemy URL Optuna's RDBStorage takes (PostgreSQL,
MySQL, SQLite). Every worker started with the same URL and study name works on one study
(`load_if_exists`); its trials' run folders go to its own output folder and run store. A
worker's trials send a heartbeat; a trial whose worker went silent (SIGKILL, a lost machine)
is failed by the next worker to start a trial and queued again by
RetryHeartbeatStaleTrialCallback. A trial's metrics, run folder and host are its user
attributes, so the front and the report are built from the storage alone. The budget
(`tune.trials`) counts finished and running trials of all workers; a worker stops when it is
taken.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from factlab.config import Experiment, TuneParam, apply_override, experiment_from_dict
from factlab.errors import FactlabError
from factlab.evaluate.facts import summarize
from factlab.evaluate.probes import PROBE_KINDS, load_probes
from factlab.experiment.events import RunEvents, TuneEvents
from factlab.experiment.run_folder import RunFolder
from factlab.experiment.store import RunStore
from factlab.experiment.sweep_cache import SweepCache

RATE_STATS = ("accuracy", "greedy_match", "sample_hit", "eos")
STAGE_METRICS = ("damage", "priming")
"""Objectives that a run's results record per stage (forgetting.<stage>), not per probe; both are minimized."""


def storage_path(store: RunStore, study: str) -> Path:
    """The Optuna SQLite file of a study: beside the run store."""
    return store.path.parent / f"{study}-optuna.db"


def _storage_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


HEARTBEAT_SECONDS = 60  # a shared study's trial is stale after 2 heartbeats without one
MAX_RETRIES = 2  # a trial whose worker dies is queued again at most this often (a trial that kills its machine stops)
DRIVERS = {"postgresql": "psycopg 3 (pip install 'psycopg[binary]'; postgresql+psycopg2:// for psycopg2)", "mysql": "MySQLdb (pip install mysqlclient) or "
           "PyMySQL with a mysql+pymysql:// URL", "sqlite": "sqlite3"}


def storage_label(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL: say so without echoing what may hold a password
        return "(the --storage URL)"


def check_storage_url(url: str) -> None:
    """A --storage URL parses as a database URL of a kind Optuna stores studies in, and its
    driver is installed; checked before anything is written."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    hint = "give a database URL such as postgresql://user:password@host/db, mysql://user@host/db or sqlite:///study.db"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise FactlabError(f"--storage {url!r} is not a database URL; {hint}") from None
    backend = parsed.get_backend_name()
    if backend not in DRIVERS:
        raise FactlabError(f"--storage {storage_label(url)}: {backend} is not a database Optuna stores studies in; {hint}")
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError:
        raise FactlabError(f"--storage {storage_label(url)}: SQLAlchemy has no driver {parsed.drivername!r}; {hint}") from None
    except ImportError as e:
        raise FactlabError(f"--storage {storage_label(url)}: its database driver is not installed ({e.name}); install "
                           f"{DRIVERS[backend]} or name an installed driver in the URL") from None


def _host() -> str:
    return socket.gethostname()


# ---------------------------------------------------------------------------------------
# Metrics of a finished (or running) trial


def metric_value(metric: str, rows: list[dict], results: dict, stage: str) -> float | None:
    """An objective's value after `stage`: `damage` as the run's results recorded it for the stage
    (forgetting.<stage>.damage: the mean over the general texts of evaluate.metrics.damage),
    `priming` likewise (forgetting.<stage>.priming.after.rate: the share of answers to locality
    probes and general prompts with a trained name the base model did not say there, see
    evaluate.priming), or `<kind>.<stat>` from the per-probe score rows (the rate of that
    kind's summary). None when it cannot be computed (no such probes; a model that produced
    no finite perplexity; priming not measured)."""
    if metric == "priming":
        after = ((((results.get("forgetting") or {}).get(stage) or {}).get("priming")) or {}).get("after") or {}
        return None if after.get("rate") is None else float(after["rate"])
    if metric == "damage":
        # the figure the run recorded for the stage (evaluate.perplexity.forgetting_summary)
        value = ((results.get("forgetting") or {}).get(stage) or {}).get("damage")
        # inf is a real answer (a wrecked model: its perplexity overflowed), NaN is not
        return None if value is None or math.isnan(value) else float(value)
    kind, _, stat = metric.partition(".")
    summary = summarize(rows).get(kind, {}).get(stat) if rows else None
    if not isinstance(summary, dict):
        return None
    v = summary.get("rate", summary.get("mean"))
    return None if v is None else float(v)


def _check_metric(metric: str, kinds: set[str], has_general_text: bool, where: str, priming: bool = True) -> None:
    if metric == "priming":
        if not priming:
            raise FactlabError(f"{where}: priming is not measured with eval.priming: false; turn it on or choose another metric")
        return
    if metric == "damage":
        if not has_general_text:
            raise FactlabError(f"{where}: damage needs general text; keep eval.builtin_general_text on or give eval.general_text")
        return
    kind, dot, stat = metric.partition(".")
    if not dot or stat not in RATE_STATS or kind not in (*PROBE_KINDS, "all"):
        raise FactlabError(f"{where}: unknown metric {metric!r}; use damage, priming or <kind>.<stat> with kind one of "
                           f"{', '.join(PROBE_KINDS)}, all and stat one of {', '.join(RATE_STATS)} (e.g. paraphrase.accuracy)")
    if kind != "all" and kind not in kinds:
        raise FactlabError(f"{where}: {metric} needs {kind} probes, but the selection probes have only "
                           f"{', '.join(sorted(kinds))}; add them to tune.select_probes or choose another metric")


# ---------------------------------------------------------------------------------------
# Parameters: Optuna distributions hold scalars, so list choices (targets) travel as JSON text


def _encode(v: Any) -> Any:
    return v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v)


def _decode(dim: TuneParam, v: Any) -> Any:
    if dim.type == "categorical" and isinstance(v, str):
        for c in dim.choices or []:
            if _encode(c) == v:
                return c
    return v


def suggest(trial, key: str, dim: TuneParam) -> Any:
    """The trial's value of one dimension (optuna's suggest_*), decoded."""
    if dim.type == "float":
        return trial.suggest_float(key, dim.low, dim.high, log=dim.log, step=dim.step)
    if dim.type == "int":
        return trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
    return _decode(dim, trial.suggest_categorical(key, [_encode(c) for c in dim.choices]))


def trial_experiment(exp: Experiment, values: dict[str, Any]) -> Experiment:
    """`exp` with a trial's values applied through the dotted-override code of `--set`, no
    sweep/tune block, scoring the selection probes and then the report probes."""
    raw = exp.model_dump(mode="json")
    raw.pop("sweep", None)
    raw.pop("tune", None)
    for key, value in values.items():
        # the keys come from tune.space (and tune.enqueue), not from a --set: say so when one is wrong
        apply_override(raw, key.split("."), value, what="tune.space")
    raw["eval"]["probes"] = list(exp.tune.select_probes) + list(exp.eval.probes)
    shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
    try:
        return experiment_from_dict(raw, source=f"the tune: block ({shown})" if values else "the tune: block", base=exp._base)
    except FactlabError as e:
        raise FactlabError(f"{e}; fix tune.space or tune.enqueue") from None


def _label(exp: Experiment, number: int, values: dict) -> str:
    from factlab.experiment.sweep import point_label

    short = {k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in values.items()}  # lr=0.000183, not 17 digits
    return f"trial {number}: {point_label(exp, short)}"


# ---------------------------------------------------------------------------------------
# Preflight


def check_tune(exp: Experiment) -> tuple[set[str], set[str]]:
    """Everything about the tune block that can be wrong, before anything is written; returns
    the ids of the selection and of the report probes."""
    t = exp.tune
    if t is None:
        raise FactlabError("the experiment has no tune: block; add space, objectives, trials and select_probes (see examples/tune.yaml)")
    if not exp.stages:
        raise FactlabError("tune needs at least one stage to train")
    if not exp.eval.probes:
        raise FactlabError("tune reports the chosen recipe on eval.probes; give eval.probes (files other than tune.select_probes)")
    for s in t.select_probes:
        for e in exp.eval.probes:
            same = Path(s).resolve() == Path(e).resolve() or (
                Path(s).is_file() and Path(e).is_file() and Path(s).read_bytes() == Path(e).read_bytes())
            if same:
                raise FactlabError(f"tune.select_probes and eval.probes both use {Path(s).name}: the probes that choose the recipe "
                                   "must be different files from those that report it (e.g. select-probes.jsonl from "
                                   "`factlab data augment --heldout-phrasings 2`)")
    select = [p for f in t.select_probes for p in load_probes(f)]
    report = [p for f in exp.eval.probes for p in load_probes(f)]
    sel_ids, rep_ids = {p.id for p in select}, {p.id for p in report}
    if sel_ids & rep_ids:
        raise FactlabError(f"probe ids {sorted(sel_ids & rep_ids)[:3]} are both in tune.select_probes and eval.probes; "
                           "a probe either chooses or reports")
    has_text = exp.eval.builtin_general_text or bool(exp.eval.general_text)
    kinds = {p.kind for p in select}
    for i, o in enumerate(t.objectives):
        _check_metric(o.metric, kinds, has_text, f"tune.objectives.{i}", exp.eval.priming)
    if t.prune:
        _check_metric(t.prune_metric or t.objectives[0].metric, kinds, has_text, "tune.prune_metric", exp.eval.priming)
    # every dimension at its ends / every choice must make a valid experiment
    for key, dim in t.space.items():
        for v in ([dim.low, dim.high] if dim.type != "categorical" else dim.choices):
            trial_experiment(exp, {key: int(v) if dim.type == "int" else v})
    for point in t.enqueue:
        trial_experiment(exp, point)
    return sel_ids, rep_ids


# ---------------------------------------------------------------------------------------
# The study


def _samplers(kind: str, seed: int):
    import optuna

    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(exp: Experiment, direction: str):
    import optuna

    t = exp.tune
    if t.prune_threshold is not None:
        # worse than the threshold: below it when maximising, above it when minimising
        return (optuna.pruners.ThresholdPruner(lower=t.prune_threshold) if direction == "maximize"
                else optuna.pruners.ThresholdPruner(upper=t.prune_threshold))
    return optuna.pruners.MedianPruner(n_startup_trials=t.prune_startup_trials, n_warmup_steps=0)


def _recover(study, pstudy, store: RunStore, events: TuneEvents) -> None:
    """Trials left `running` by a killed process: failed in Optuna and in the store, and their
    parameters enqueued again."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        run_dir = t.user_attrs.get("run_dir")
        if run_dir:
            store.mark(Path(run_dir), "failed", "killed while running; retried")
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        events.trial_requeued(t.number)
    if pstudy is not None:
        for t in pstudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pstudy.tell(t.number, state=TrialState.FAIL)


def _mark_local_runs(trials, store: RunStore, note: str) -> None:
    """Failed trials' runs whose folders are on this host in `store` and still `running`
    there: marked failed (another machine's store is out of reach; its own worker does it when
    it starts again)."""
    mine = [t.user_attrs["run_dir"] for t in trials if t.user_attrs.get("run_dir") and t.user_attrs.get("host") == _host()
            and t.user_attrs.get("store") == str(store.path.resolve())]
    if not mine:
        return
    running = {r["run_dir"] for r in store.runs(status="running")}
    for run_dir in mine:
        if run_dir in running:
            store.mark(Path(run_dir), "failed", note)


class _StaleTrial:
    """The heartbeat_stale_trial_callback of a shared study: a trial whose worker stopped
    sending heartbeats (already failed by Optuna) has its shadow pruning trial failed, its run
    marked failed when the run is in this machine's store, and is queued again by Optuna's
    RetryHeartbeatStaleTrialCallback (params, user attrs; the original number in
    system_attrs["failed_trial"])."""

    def __init__(self, store: RunStore, events: TuneEvents):
        from optuna.exceptions import ExperimentalWarning
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        self.store, self.events, self.pstudy = store, events, None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)

    def __call__(self, study, trial) -> None:
        from optuna.trial import TrialState

        shadow = trial.user_attrs.get("prune_trial")
        if self.pstudy is not None and shadow is not None:
            self.pstudy.tell(shadow, state=TrialState.FAIL, skip_if_finished=True)
        _mark_local_runs([trial], self.store, "its worker stopped (no heartbeat); retried")
        self.retry(study, trial)
        self.events.trial_lost(trial.number, trial.user_attrs.get("host", "?"))


def _shared_storage(url: str, heartbeat: int | None, on_stale: _StaleTrial | None, read_only: bool = False):
    """Optuna's RDBStorage at `url`: with heartbeats and the stale-trial callback for a worker,
    without (and without creating tables) for a reader."""
    import optuna
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if read_only and parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
            and not Path(parsed.database).is_file():
        raise FactlabError(f"--storage {url}: {parsed.database} does not exist; give the SQLite file the study was run with")
    kwargs = {} if read_only else {"heartbeat_interval": heartbeat, "grace_period": 2 * heartbeat,
                                   "heartbeat_stale_trial_callback": on_stale}
    if not read_only and parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)  # SQLite makes the file, not its folder
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval: "experimental" since 2.x
            return optuna.storages.RDBStorage(url, skip_table_creation=read_only,
                                              engine_kwargs=None if parsed.get_backend_name() == "sqlite" else {"pool_pre_ping": True},
                                              **kwargs)
    except sqlalchemy.exc.SQLAlchemyError as e:
        first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
        raise FactlabError(f"--storage {storage_label(url)}: cannot open the study storage ({first}); check the URL, "
                           "that the database exists and that this machine may connect to it") from None


def _same_attr(study, key: str, value, where: str, name: str) -> None:
    """Workers sharing a study must run the same search: its objectives and space."""
    stored = study.user_attrs.get(key)
    if stored is not None and stored != json.loads(json.dumps(value)):
        raise FactlabError(f"study {name} in {where} was started with another tune.{key}; give every worker the same "
                           "experiment file, or another --study-name to start a new study")


def run_tune(exp: Experiment, store: RunStore, events: TuneEvents | None = None, storage: str | None = None,
             study_name: str | None = None, heartbeat: int = HEARTBEAT_SECONDS):
    """Run (or resume) the study of `exp.tune`; returns the Optuna study. `events` is told of
    every trial and, through each trial's run_experiment, of its run (experiment.events; its
    on_stage / on_done are the runner's presentation callbacks, passed to every trial).
    `storage`: an RDB URL shared by several workers (default: a SQLite file beside `store`,
    one process at a time); `study_name` (default: the experiment's name) also names the
    trials' sweep and run folders' parent."""
    import optuna
    from optuna.trial import TrialState

    # Imported here, not at the top: the runner loads torch and transformers, which the
    # readers of a study (factlab report, load_study) do not need.
    from factlab.experiment.runner import run_experiment

    events = events or TuneEvents()
    console = events.console
    t = exp.tune
    from factlab.experiment.tune_guard import preflight_tune

    # before the study's storage, the run store or any run folder exists (see tune_guard)
    sel_ids, rep_ids = preflight_tune(exp, store, storage, study_name, console)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name or exp.name
    directions = [o.direction for o in t.objectives]
    seed = exp.seed if t.seed is None else t.seed
    on_stale = None
    if storage is None:
        db = storage_path(store, name)
        db.parent.mkdir(parents=True, exist_ok=True)
        where, url = str(db), _storage_url(db)
    else:
        where, on_stale = storage_label(storage), _StaleTrial(store, events)
        url = _shared_storage(storage, heartbeat, on_stale)
    study = optuna.create_study(storage=url, study_name=name, directions=directions, load_if_exists=True,
                                sampler=_samplers(t.sampler, seed))
    if [d.name.lower() for d in study.directions] != directions:
        raise FactlabError(f"study {name} in {where} has other objectives ({len(study.directions)}); "
                           + ("rename the experiment or delete that file to start a new study" if storage is None
                              else "give another --study-name to start a new study"))
    attrs = {"objectives": [o.model_dump() for o in t.objectives], "select_probes": list(t.select_probes),
             "eval_probes": list(exp.eval.probes), "space": {k: v.model_dump() for k, v in t.space.items()}}
    if storage is None:
        attrs["store"] = str(store.path)
    else:
        for key in ("objectives", "space"):
            _same_attr(study, key, attrs[key], where, name)
    for k, v in attrs.items():
        if storage is None or k not in study.user_attrs:  # a shared study keeps its first worker's probe paths
            study.set_user_attr(k, v)
    # Reseed by history: a resumed study must not draw the first invocation's random points
    # again; workers of a shared study must not draw each other's (they may start together).
    salt = 0 if storage is None else zlib.crc32(f"{_host()}:{os.getpid()}".encode())
    study.sampler = _samplers(t.sampler, (seed + len(study.trials) + salt) % 2**32)
    prune_metric = t.prune_metric or t.objectives[0].metric
    prune_dir = next((o.direction for o in t.objectives if o.metric == prune_metric),
                     "minimize" if prune_metric in STAGE_METRICS else "maximize")
    pstudy = (optuna.create_study(storage=url, study_name=f"{name}:prune", direction=prune_dir, load_if_exists=True,
                                  pruner=_pruner(exp, prune_dir)) if t.prune else None)
    if storage is None:
        _recover(study, pstudy, store, events)
    else:
        on_stale.pstudy = pstudy
        # this machine's runs of trials that failed while it was away: failed in its store too
        _mark_local_runs(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)), store, "its worker stopped; retried")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # trials left running by a dead worker (a retry is queued)
    for point in t.enqueue:
        study.enqueue_trial({k: _encode(v) for k, v in point.items()}, skip_if_exists=True)

    def taken() -> tuple[int, int]:
        """(finished, running) trials of the study, every worker's."""
        finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        return finished, len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    def budget(study_, trial_) -> None:
        # another worker's running trials count: they finish the budget without this one
        if t.trials is not None and sum(taken()) >= t.trials:
            study_.stop()

    finished, running = taken()
    remaining = None if t.trials is None else max(0, t.trials - finished - running)
    # the cheap early signal: the first prune_probes selection probes (default: all of them)
    select_order = [p.id for f in t.select_probes for p in load_probes(f)]
    objective = TrialObjective(
        exp, store, name, events, run_experiment, sel_ids=sel_ids, rep_ids=rep_ids,
        prune_ids=set(select_order[: t.prune_probes]) if t.prune_probes else sel_ids,
        prune_metric=prune_metric, pstudy=pstudy, optuna_study=study)

    if remaining == 0:
        events.budget_taken(name, finished, running, t.trials)
    else:
        t0 = time.perf_counter()
        study.optimize(objective, n_trials=remaining, timeout=t.timeout_minutes * 60 if t.timeout_minutes else None,
                       catch=(), callbacks=[budget])
        events.study_ran(name, time.perf_counter() - t0)
    return study




class TrialObjective:
    """The objective of a study (Optuna calls it with each trial): the trial's values applied
    to the experiment, its run made by `run` (experiment.runner.run_experiment) in the study's
    folder and store, reported after each stage to the shadow pruning trial of `pstudy`, and
    its objectives computed on the selection probes (the same metrics on the report probes
    stored as user attributes)."""

    def __init__(self, exp: Experiment, store: RunStore, study: str, events: RunEvents, run: Callable[..., Path], *,
                 sel_ids: set[str], rep_ids: set[str], prune_ids: set[str], prune_metric: str, pstudy=None,
                 optuna_study=None):
        self.exp, self.store, self.study, self.events, self.run = exp, store, study, events, run
        self.sel_ids, self.rep_ids, self.prune_ids = sel_ids, rep_ids, prune_ids
        self.prune_metric, self.pstudy = prune_metric, pstudy
        self.optuna_study = optuna_study
        """The study the trials belong to (an interrupted trial is queued again there)."""
        self.root = Path(exp.output_dir) / study
        self.cache = SweepCache()  # the untrained model's evaluation is shared by every trial

    def __call__(self, trial) -> float | tuple[float, ...]:
        import optuna
        from optuna.trial import TrialState

        from factlab.experiment.runner import RunOptions

        exp, t, store, pstudy = self.exp, self.exp.tune, self.store, self.pstudy
        values = {k: suggest(trial, k, dim) for k, dim in t.space.items()}
        texp = trial_experiment(exp, values)
        run_dir = self.root / f"trial-{trial.number:03d}"
        if run_dir.exists():  # left by an interrupted invocation
            shutil.rmtree(run_dir)
        trial.set_user_attr("run_dir", str(run_dir))
        # where the run folder is: a shared study's report names it; a lost worker's run is marked by its own host
        trial.set_user_attr("host", _host())
        trial.set_user_attr("store", str(store.path.resolve()))
        trial.set_user_attr("worker", f"{_host()}:{os.getpid()}")
        with warnings.catch_warnings():
            # the shadow trial has no heartbeat of its own: the stale-trial callback fails it with its trial
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
            shadow = pstudy.ask() if pstudy is not None else None
        if shadow is not None:
            trial.set_user_attr("prune_trial", shadow.number)

        label = _label(exp, trial.number, values)
        self.events.trial_started(trial.number, label.split(": ", 1)[1])
        options = RunOptions(run_dir=run_dir, store=store, sweep=self.study, point={"trial": trial.number, **values},
                             label=label, cache=self.cache)
        events = copy.copy(self.events)  # the study's presentation, with this trial's hook after each stage
        events.on_stage = lambda folder, record: self.stage_done(trial, shadow, texp, folder, record)
        try:
            self.run(texp, options, events)
        except optuna.TrialPruned as e:
            store.mark(run_dir, "pruned", str(e))
            pstudy.tell(shadow, state=TrialState.PRUNED)
            self.events.trial_pruned(trial.number, str(e))
            raise
        except BaseException as e:
            if shadow is not None:
                pstudy.tell(shadow, state=TrialState.FAIL)
            if isinstance(e, KeyboardInterrupt):
                from factlab.experiment.tune_guard import discard_interrupted_trial

                discard_interrupted_trial(self.optuna_study, trial, run_dir, store)
            raise
        return self.finish(trial, shadow, texp, run_dir)

    def stage_done(self, trial, shadow, texp: Experiment, folder: RunFolder, record) -> None:
        """After each stage: the study's stage_done (the caller's on_stage), then the prune metric reported to the
        shadow trial, which may stop the trial (optuna.TrialPruned)."""
        import optuna

        self.events.stage_done(folder, record)
        if shadow is None:
            return
        stage = record.name
        i = texp.stage_names().index(stage)
        results = folder.read_results().to_json()
        rows = [r for r in folder.read_scores(stage) if r["id"] in self.prune_ids]
        v = metric_value(self.prune_metric, rows, results, stage)
        if v is None or math.isnan(v):
            return
        shadow.report(v, i)
        trial.set_user_attr(f"intermediate.{i}", v)
        # Pruning after the last stage would save nothing and drop a finished trial (which
        # may still be on the front through its other objectives): only earlier stages.
        if i < len(texp.stages) - 1 and shadow.should_prune():
            raise optuna.TrialPruned(f"after stage {stage}: {self.prune_metric} = {v:.4g}")

    def finish(self, trial, shadow, texp: Experiment, run_dir: Path) -> float | tuple[float, ...]:
        """A finished trial's objectives on the selection probes (and the report probes' values
        as user attributes) from its run folder."""
        from optuna.trial import TrialState

        t, pstudy = self.exp.tune, self.pstudy
        folder = RunFolder(run_dir)
        results = folder.read_results().to_json()
        last = texp.stage_names()[-1]
        rows = folder.read_scores(last)
        sel = [r for r in rows if r["id"] in self.sel_ids]
        rep = [r for r in rows if r["id"] in self.rep_ids]
        chosen = [metric_value(o.metric, sel, results, last) for o in t.objectives]
        reported = [metric_value(o.metric, rep, results, last) for o in t.objectives]
        trial.set_user_attr("report", {o.metric: v for o, v in zip(t.objectives, reported)})
        trial.set_user_attr("report_kinds", {k: s["accuracy"]["rate"] for k, s in summarize(rep).items()} if rep else {})
        trial.set_user_attr("select_kinds", {k: s["accuracy"]["rate"] for k, s in summarize(sel).items()} if sel else {})
        trial.set_user_attr("select", {o.metric: v for o, v in zip(t.objectives, chosen)})
        if shadow is not None:
            pv = metric_value(self.prune_metric, [r for r in rows if r["id"] in self.prune_ids], results, last)
            pstudy.tell(shadow, pv if pv is not None and not math.isnan(pv) else None,
                        state=None if pv is not None and not math.isnan(pv) else TrialState.FAIL)
        if any(v is None for v in chosen):
            missing = [o.metric for o, v in zip(t.objectives, chosen) if v is None]
            raise FactlabError(f"trial {trial.number}: {', '.join(missing)} could not be computed on the selection probes "
                               f"(see {RunFolder(run_dir).results_path})")
        return tuple(chosen) if len(chosen) > 1 else chosen[0]


def front_table(study) -> Table:
    """The Pareto front: trial, settings, objectives on the selection probes and the same
    metrics on the report probes."""
    objectives = study.user_attrs.get("objectives", [])
    table = Table(title=f"study {study.study_name}: Pareto front ({len(study.best_trials)} of "
                        f"{len(study.trials)} trials; chosen on tune.select_probes, reported on eval.probes)")
    table.add_column("trial", justify="right")
    table.add_column("settings")
    for o in objectives:
        arrow = "↑" if o["direction"] == "maximize" else "↓"
        table.add_column(f"{o['metric']} {arrow} (select)", justify="right")
        table.add_column(f"{o['metric']} (report)", justify="right")
    for tr in front_trials(study):
        cells = []
        rep = tr.user_attrs.get("report", {})
        for o, v in zip(objectives, tr.values):
            r = rep.get(o["metric"])
            cells += [f"{v:.3f}", "-" if r is None else f"{r:.3f}"]
        table.add_row(str(tr.number), settings_text(tr.params), *cells)
    return table


def front_trials(study) -> list:
    """study.best_trials (the Pareto front; the best trial for one objective), by number."""
    return sorted(study.best_trials, key=lambda t: t.number)


def settings_text(params: dict) -> str:
    """`lr=0.0003 r=8`: the last part of each dotted key, with its value."""
    out = []
    for k, v in params.items():
        if isinstance(v, float):
            v = f"{v:.3g}"
        out.append(f"{k.split('.')[-1]}={v}")
    return " ".join(out)


def load_study(store: RunStore, name: str, storage: str | None = None):
    """The Optuna study `name` in `storage` (an RDB URL) or beside `store`, or None when there is none."""
    import optuna

    if storage is None:
        path = storage_path(store, name)
        if not path.is_file():
            return None
        url = _storage_url(path)
    else:
        check_storage_url(storage)
        url = _shared_storage(storage, None, None, read_only=True)
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return None
    except sqlalchemy.exc.SQLAlchemyError as e:  # e.g. a database without Optuna's tables
        first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
        raise FactlabError(f"--storage {storage_label(storage or url)}: cannot read studies there ({first}); "
                           "give the URL the study was run with") from None
