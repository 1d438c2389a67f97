"""Sweeps: the `sweep:` block of an experiment expands into one run per grid point (times
`repeat` seeds); runs go one after another under one progress bar, each indexed in the run
store, and a restarted sweep skips the points that finished.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from factlab.config import Experiment, apply_override, experiment_from_dict
from factlab.errors import FactlabError
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


def run_sweep(exp: Experiment, store: RunStore, console: Console | None = None, mlflow: bool = False) -> list[Path]:
    """Run every point not already finished in `store`; returns the run folders in point order.

    A point whose run is marked `running` (a sweep killed mid-run) is redone from scratch.
    """
    from factlab.experiment.runner import run_experiment

    from factlab.experiment.preflight import preflight_sweep

    console = console or Console(stderr=True)
    points = expand_sweep(exp)
    preflight_sweep(points, console)  # a bad later point fails now, not after earlier points trained
    root = Path(exp.output_dir) / exp.name
    folders: list[Path] = []
    base_cache: dict = {}  # the untrained model's evaluation, shared by points that agree on it
    with Progress(TextColumn("[bold]sweep {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(exp.name, total=len(points))
        for p in points:
            cfg = p.experiment.model_dump(mode="json")
            done = store.done_point(exp.name, config_hash(cfg))
            if done:
                console.print(f"[dim]skip {p.folder}: finished in {done}[/dim]")
                folders.append(Path(done))
                progress.advance(task)
                continue
            run_dir = root / p.folder
            if run_dir.exists():  # left by an interrupted run: redo it
                shutil.rmtree(run_dir)
            console.rule(f"point {p.index + 1}/{len(points)}: {p.label}")
            run_experiment(p.experiment, console=console, run_dir=run_dir, store=store, sweep=exp.name, point=p.overrides,
                           label=p.label, mlflow=mlflow, base_cache=base_cache)
            folders.append(run_dir)
            progress.advance(task)
    return folders
