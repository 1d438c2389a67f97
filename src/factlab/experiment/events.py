"""What a run, a sweep and a tune study tell their caller as they go.

The orchestrators (experiment.runner, experiment.sweep, experiment.tune) compute and write;
they report each step by calling one of these methods and print nothing themselves. The
classes here show every event as a line on `console` (stderr by default), which is what the
CLI shows; a caller changes the presentation by overriding a method, and adds to it through
`on_stage` / `on_done` (the CLI's tables and loss plots, from report/). `console` is also
the sink the lower layers draw their progress on (model download, the training progress
bar, the evaluation spinner); a quiet Console silences everything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from factlab.experiment.run_folder import RunFolder, RunResults, StageRecord

if TYPE_CHECKING:  # the annotation only: importing the events (sweep, tune, report) loads no torch
    from factlab.train.stage import StageResult

StageCallback = Callable[[RunFolder, StageRecord], None]
RunCallback = Callable[[RunFolder, RunResults, "str | None"], None]


class RunEvents:
    """The events of one run (experiment.runner.run_experiment)."""

    def __init__(self, console: Console | None = None, on_stage: StageCallback | None = None,
                 on_done: RunCallback | None = None):
        self.console = console or Console(stderr=True)
        self.on_stage = on_stage
        """Called after each stage is saved and evaluated (in a sweep worker's process with
        --workers: then it must be a module-level function)."""
        self.on_done = on_done
        """Called once the run is complete and logged: (folder, results, MLflow run id or None)."""

    def run_started(self, folder: RunFolder, model_path: str | Path) -> None:
        self.console.print(f"run folder: [bold]{folder.path}[/bold]  (model {model_path})")

    def evaluation_reused(self, label: str, source: RunFolder) -> None:
        self.console.print(f"[dim]{label} evaluation reused from {source.path} (same model, probes and settings)[/dim]")

    def stage_reused(self, name: str, source: RunFolder) -> None:
        self.console.print(f"[dim]stage {name} reused from {source.path} (same model, settings, data and seed)[/dim]")

    def stage_trained(self, name: str, res: StageResult) -> None:
        where = "" if res.device == "cpu" and res.processes == 1 else \
            f" on {res.device}" + (f" x {res.processes} processes" if res.processes > 1 else "")
        if res.edit is not None:
            self.console.print(f"stage {name}: {res.method} edit of {res.edit['facts']} facts, target NLL "
                               f"{res.first_loss:.3f} → {res.final_loss:.3f}, {res.edit['seconds_per_fact']:.1f} s per fact, "
                               f"{res.seconds:.0f} s{where}")
        else:
            self.console.print(
                f"stage {name}: {res.steps} steps, loss {res.first_loss:.3f} → {res.final_loss:.3f}, "
                f"{res.tokens_per_second:,.0f} tok/s{f' ({res.precision})' if res.precision != 'fp32' else ''}{where}, "
                f"{res.seconds:.0f} s"
            )

    def stage_done(self, folder: RunFolder, stage: StageRecord) -> None:
        if self.on_stage is not None:
            self.on_stage(folder, stage)

    def run_done(self, folder: RunFolder, results: RunResults, mlflow_run: str | None) -> None:
        if self.on_done is not None:
            self.on_done(folder, results, mlflow_run)
        self.console.print(f"results: {folder.results_path}")


class SweepEvents(RunEvents):
    """The events of a sweep (experiment.sweep.run_sweep) and of each of its runs."""

    def point_skipped(self, folder: str, done: str) -> None:
        self.console.print(f"[dim]skip {folder}: finished in {done}[/dim]")

    def point_started(self, number: int, total: int, label: str) -> None:
        self.console.rule(f"point {number}/{total}: {label}")

    def fewer_workers(self, workers: int, cpus: int, processes: int) -> None:
        self.console.print(f"[yellow]--workers {workers} on {cpus} CPUs: running {processes} processes "
                           "(never more processes than CPUs)[/yellow]")

    def workers_started(self, sweep: str, points: int, processes: int, threads: int, logs: Path) -> None:
        self.console.print(f"sweep {sweep}: {points} points in {processes} processes of {threads} thread(s) each; "
                           f"their logs in {logs}", markup=False, highlight=False)

    def point_finished(self, number: int, total: int, seconds: float, label: str, run_dir: str) -> None:
        """A point run by a worker process has finished (the parallel sweep's line per point)."""
        self.console.print(f"point {number}/{total} done in {seconds:.0f} s: {label}  ({run_dir})",
                           markup=False, highlight=False)

    def workers_done(self, points: int, seconds: float) -> None:
        self.console.print(f"[dim]{points} points in {seconds:.0f} s[/dim]")


class TuneEvents(RunEvents):
    """The events of a tune study (experiment.tune.run_tune) and of each trial's run."""

    def trial_started(self, number: int, label: str) -> None:
        self.console.rule(f"trial {number}: {label}")

    def trial_pruned(self, number: int, why: str) -> None:
        self.console.print(f"[yellow]trial {number} pruned {why}[/yellow]")

    def trial_requeued(self, number: int) -> None:
        """A trial left running by a killed process, failed and queued again."""
        self.console.print(f"[yellow]trial {number} was interrupted: marked failed and queued again[/yellow]")

    def trial_lost(self, number: int, host: str) -> None:
        """A shared study's trial whose worker stopped sending heartbeats, queued again."""
        self.console.print(f"[yellow]trial {number} (on {host}) lost its worker: marked failed and queued again[/yellow]")

    def budget_taken(self, study: str, finished: int, running: int, trials: int) -> None:
        busy = f" and {running} running" if running else ""
        self.console.print(f"[dim]study {study} already has {finished} finished{busy} trials (tune.trials = {trials})[/dim]")

    def study_ran(self, study: str, seconds: float) -> None:
        self.console.print(f"[dim]study {study}: {seconds:.0f} s this invocation[/dim]")
