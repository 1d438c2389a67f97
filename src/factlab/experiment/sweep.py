"""Sweeps: the `sweep:` block of an experiment expands into one run per grid point (times
`repeat` seeds); runs go one after another under one progress bar, each indexed in the run
store, and a restarted sweep skips the points that finished. Work that points share is reused
through one SweepCache (experiment.sweep_cache).

With `workers` > 1 the points run in that many processes on this machine (started with
`spawn`), each with its share of the CPU threads (`worker_plan`), so that together they never
ask for more threads than there are CPUs. The parent checks every point first (preflight),
hands out the unfinished ones in point order, prints each as it finishes, and is the only
one that prints tables; the workers write their runs and the store (SQLite takes concurrent
writers) and log to `<output_dir>/<sweep>/logs/<point>.log`. Each worker keeps its own
SweepCache across the points it runs, so work the points share is done at most once per
worker. A worker whose sweep was killed ends within a second (factlab.train.distributed.
exit_with_parent), leaving its point `running` for the restarted sweep to redo.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from factlab.progress import progress_bar

from factlab.config import Experiment, apply_override, experiment_from_dict
from factlab.errors import FactlabError
from factlab.experiment.events import StageCallback, SweepEvents
from factlab.experiment.run_folder import RunFolder
from factlab.experiment.sweep_cache import SweepCache
from factlab.experiment.store import RunStore, config_hash


@dataclass
class SweepPoint:
    index: int
    overrides: dict
    """Dotted key -> value for this point (and `seed` when the sweep repeats)."""
    experiment: Experiment
    label: str = "default"
    """Human-readable overrides, e.g. `cpt.alpha=32 sft.targets=attention`."""

    @property
    def folder(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9.=,_-]+", "_", self.label.replace(" ", "_"))[:80]
        return f"{self.index:03d}-{slug}"


def point_label(exp: Experiment, overrides: dict) -> str:
    """`stages.1.peft.alpha=8` reads as `sft.alpha=8` (the stage's name); other keys by their
    last part."""
    names = exp.stage_names()
    parts = []
    for key, value in overrides.items():
        bits = key.split(".")
        short = bits[-1]
        if bits[0] == "stages" and len(bits) > 2 and bits[1].isdigit() and int(bits[1]) < len(names):
            short = f"{names[int(bits[1])]}.{bits[-1]}"
        if len(bits) == 2 and bits[0] == "stages" and bits[1].isdigit() and isinstance(value, dict):
            # a whole stage swapped in (e.g. edit vs distill): named by the stage it replaces and its kind
            short = names[int(bits[1])] if int(bits[1]) < len(names) else key
            value = value.get("kind", "?")
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{short}={text}")
    return " ".join(parts) or "default"


def expand_sweep(exp: Experiment) -> list[SweepPoint]:
    """Every item of `points` x every point of the grid (keys in file order, last key fastest)
    x `repeat` seeds."""
    grid = {k: v for k, v in exp.sweep.items() if k not in ("repeat", "points")}
    repeat = int(exp.sweep.get("repeat", 1))
    explicit = exp.sweep.get("points") or [{}]
    base = exp.model_dump(mode="json")
    base.pop("sweep", None)
    points = []
    combos = list(itertools.product(*grid.values())) if grid else [()]
    for fixed, combo in itertools.product(explicit, combos):
        for r in range(repeat):
            overrides = {**fixed, **dict(zip(grid, combo))}
            if repeat > 1:
                overrides["seed"] = exp.seed + r
            raw = json.loads(json.dumps(base))
            for key, value in overrides.items():
                apply_override(raw, key.split("."), value, what="sweep")
            try:
                # relative paths in sweep values resolve like the file's own: against its folder
                point_exp = experiment_from_dict(raw, source=f"sweep point {overrides}", base=exp._base)
                point_exp.output_dir = exp.output_dir  # already resolved (or set by -o); not again
            except FactlabError as e:
                raise FactlabError(f"{e} (check the sweep: block)") from None
            points.append(SweepPoint(len(points), overrides, point_exp, point_label(exp, overrides)))
    return points


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def worker_plan(workers: int, cpus: int) -> tuple[int, int]:
    """(processes, threads per process) for `workers` asked on `cpus` CPUs: at most one
    process per CPU and cpus // processes threads each, so processes x threads <= cpus."""
    n = max(1, min(workers, cpus))
    return n, max(1, cpus // n)


@dataclass
class SweepOptions:
    """How a sweep runs its points (the defaults: one after another, no MLflow)."""

    workers: int = 1
    """Processes that run points in parallel (see the module's doc)."""
    mlflow: bool = False
    """Also log each run to MLflow."""


def run_sweep(exp: Experiment, store: RunStore, options: SweepOptions | None = None,
              events: SweepEvents | None = None) -> list[Path]:
    """Run every point not already finished in `store`; returns the run folders in point order.

    A point whose run is marked `running` (a sweep killed mid-run) is redone from scratch.
    `events` is told of every point and, through each point's run_experiment, of its runs
    (presentation; experiment.events). With `options.workers` > 1 the points run in parallel
    processes (see the module's doc): `events.on_stage` then runs in the workers (it must be
    a module-level function) and `events.on_done` in this process.
    """
    from factlab.experiment.preflight import preflight_sweep

    options = options or SweepOptions()
    events = events or SweepEvents()
    console = events.console
    points = expand_sweep(exp)
    preflight_sweep(points, console)  # a bad later point fails now, not after earlier points trained
    root = Path(exp.output_dir) / exp.name
    folders: dict[int, Path] = {}
    todo: list[SweepPoint] = []
    for p in points:
        done = store.done_point(exp.name, config_hash(p.experiment.model_dump(mode="json")))
        if done:
            events.point_skipped(p.folder, done)
            folders[p.index] = Path(done)
        else:
            todo.append(p)
    with progress_bar(console) as progress:
        task = progress.add_task(f"sweep {exp.name}", total=len(points), completed=len(points) - len(todo))
        if options.workers > 1 and len(todo) > 1:
            cpus = available_cpus()
            if options.workers > cpus:
                events.fewer_workers(options.workers, cpus, min(cpus, len(todo)))
            n, threads = worker_plan(min(options.workers, len(todo)), cpus)  # no idle worker holds threads back
            parallel = _Parallel(exp, root, store, options.mlflow, events, lambda p: progress.advance(task), len(points))
            folders.update(parallel.run(todo, n, threads))
        else:
            # Imported here, not at the top: the runner loads torch and transformers, which
            # `factlab sweep --dry-run` (expand_sweep, preflight) does not need.
            from factlab.experiment.runner import RunOptions, run_experiment

            cache = SweepCache()
            for p in todo:
                done = store.done_point(exp.name, config_hash(p.experiment.model_dump(mode="json")))
                if done:  # the same settings as an earlier point of this sweep
                    events.point_skipped(p.folder, done)
                    folders[p.index] = Path(done)
                    progress.advance(task)
                    continue
                events.point_started(p.index + 1, len(points), p.label)
                run = RunOptions(run_dir=_fresh_run_dir(root / p.folder), store=store, sweep=exp.name, point=p.overrides,
                                 label=p.label, mlflow=options.mlflow, cache=cache)
                folders[p.index] = run_experiment(p.experiment, run, events)
                progress.advance(task)
    return [folders[p.index] for p in points]


def _fresh_run_dir(run_dir: Path) -> Path:
    if run_dir.exists():  # left by an interrupted run: redo it
        shutil.rmtree(run_dir)
    return run_dir


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class _Parallel:
    """A sweep's points in spawned worker processes: what every point shares."""

    exp: Experiment
    root: Path
    """<output_dir>/<sweep>: the points' run folders and logs/."""
    store: RunStore
    mlflow: bool
    events: SweepEvents
    advance: Callable[[SweepPoint], None]
    """Called in this process as each point finishes (the sweep's progress bar)."""
    total: int
    """Points in the whole sweep (finished ones included), for the `point i/total` lines."""

    def run(self, todo: list[SweepPoint], n: int, threads: int) -> dict[int, Path]:
        """The unfinished points in `n` spawned processes of `threads` threads each; returns
        {point index: run folder}. The first point that fails stops the sweep: points not yet
        started are cancelled, running ones finish, then the error is raised here."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        self.store.ensure()  # created here, before the workers race to write it
        self.events.workers_started(self.exp.name, len(todo), n, threads, self.root / "logs")
        out: dict[int, Path] = {}
        started = time.perf_counter()
        # Spawned children read their thread counts from the environment when torch loads; this
        # process's own thread pool was sized when it started, so setting them here changes only theirs.
        saved = {var: os.environ.get(var) for var in _THREAD_VARS}
        os.environ.update({var: str(threads) for var in _THREAD_VARS})
        try:
            with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_start_worker, initargs=(threads,)) as pool:
                self.collect(pool, todo, out)
        finally:
            for var, value in saved.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value
        self.events.workers_done(len(todo), time.perf_counter() - started)
        return out

    def collect(self, pool, todo: list[SweepPoint], out: dict[int, Path]) -> None:
        """Submit every point to `pool` and report each as it finishes into `out`."""
        from concurrent.futures import as_completed

        futures = {pool.submit(_run_point, p.experiment, str(self.root / p.folder), str(self.store.path), self.exp.name,
                               p.overrides, p.label, self.mlflow, self.events.on_stage,
                               str(self.root / "logs" / f"{p.folder}.log")): p for p in todo}
        try:
            for fut in as_completed(futures):
                p = futures[fut]
                run_dir, mlflow_run, seconds = fut.result()
                out[p.index] = Path(run_dir)
                self.events.point_finished(p.index + 1, self.total, seconds, p.label, run_dir)
                if self.events.on_done is not None:
                    folder = RunFolder(Path(run_dir))
                    self.events.on_done(folder, folder.read_results(), mlflow_run)
                self.advance(p)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


_worker_cache: SweepCache | None = None
"""A worker process's SweepCache, kept across the points it runs."""


def _start_worker(threads: int) -> None:
    """A sweep worker's first act: its share of the threads, before any torch work."""
    global _worker_cache
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)
    from factlab.train.distributed import exit_with_parent

    exit_with_parent()
    _worker_cache = SweepCache()


def _run_point(experiment: Experiment, run_dir: str, store_path: str, sweep: str, point: dict, label: str,
               mlflow: bool, on_stage: StageCallback | None, log_path: str) -> tuple[str, str | None, float]:
    """One point in a worker: (run folder, MLflow run id or None, seconds)."""
    import warnings

    from factlab.experiment.runner import RunOptions, run_experiment

    # The worker is a fresh interpreter: quieten the libraries as the CLI does in its own.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    logged: list = []
    with open(log_path, "w", encoding="utf-8") as log:
        console = Console(file=log, width=160, force_terminal=False)
        options = RunOptions(run_dir=_fresh_run_dir(Path(run_dir)), store=RunStore(store_path), sweep=sweep, point=point,
                             label=label, mlflow=mlflow, cache=_worker_cache)
        events = SweepEvents(console, on_stage=on_stage, on_done=lambda folder, results, run_id: logged.append(run_id))
        path = run_experiment(experiment, options, events)
    return str(path), (logged[0] if logged else None), time.perf_counter() - t0

