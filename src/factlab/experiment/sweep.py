"""Sweeps: the `sweep:` block of an experiment expands into one run per grid point (times
`repeat` seeds); runs go one after another under one progress bar, each indexed in the run
store, and a restarted sweep skips the points that finished. Work that points share is reused
through one SweepCache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from factlab.train.progress import progress_bar

from factlab.config import Experiment, apply_override, experiment_from_dict
from factlab.errors import FactlabError
from factlab.experiment.run_folder import EvalRecord, RunFolder, RunResults, StageRecord
from factlab.experiment.store import RunStore, config_hash


def content_hash(parts: object, streams: Iterable[Iterable] = ()) -> str:
    """The one hash of the reuse cache: JSON of `parts` (sorted keys), then every item of each
    stream in turn with a boundary after each stream. Large inputs (a stage's token ids) are
    streamed into the hash rather than built into one JSON string."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for stream in streams:
        for item in stream:
            h.update(json.dumps(item, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a finished file (never modified afterwards); copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class SweepCache:
    """Work that the points of one `factlab sweep` call share, reused because it is
    deterministic on CPU and repeating it would cost as much as the new work. Each entry is
    keyed on exactly what it was computed from:

    - the untrained model's evaluation (`base`): the model, the eval settings, the contents of
      the probe and general-text files, the seed and the SFT prompts (style) — `base_key`;
    - its in-context evaluation (`base+context`): the base key plus the context text itself,
      which may come from a stage's corpus (`context_key`);
    - a merged stage that is not the last one (the CPT stage of a sweep over SFT settings):
      the base key, the settings and names of the stages up to it and the training examples
      they saw (`stage_key`). Its folder is hard-linked into the new run.
    """

    def __init__(self) -> None:
        self._evaluations: dict[str, tuple[RunFolder, EvalRecord]] = {}
        self._stages: dict[str, tuple[RunFolder, StageRecord, EvalRecord]] = {}

    @staticmethod
    def base_key(exp: Experiment, model_path: Path, sft_conversations: list | None) -> str:
        files = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in exp.eval.probes + exp.eval.general_text]
        return content_hash({"model": str(model_path), "eval": exp.eval.model_dump(mode="json"), "seed": exp.seed,
                             "device": exp.device, "files": files, "sft": sft_conversations})

    @staticmethod
    def context_key(base_key: str, context: str) -> str:
        return content_hash({"base": base_key, "context": context})

    @staticmethod
    def stage_key(base_key: str, exp: Experiment, i: int, stage_examples: list) -> str:
        return content_hash({"base": base_key, "stages": [st.model_dump(mode="json") for st in exp.stages[: i + 1]],
                             "names": exp.stage_names()[: i + 1]}, streams=stage_examples[: i + 1])

    def evaluation(self, key: str) -> tuple[RunFolder, EvalRecord] | None:
        """(the run that made it, the record) of an evaluation with this key, if any."""
        return self._evaluations.get(key)

    def keep_evaluation(self, key: str, folder: RunFolder, ev: EvalRecord) -> None:
        self._evaluations[key] = (folder, ev)

    def stage(self, key: str) -> tuple[RunFolder, StageRecord, EvalRecord] | None:
        """A trained stage with this key whose merged model is still on disk."""
        hit = self._stages.get(key)
        if hit is None or hit[0].merged_model(hit[1]) is None:
            return None
        return hit

    def keep_stage(self, key: str, folder: RunFolder, stage: StageRecord, ev: EvalRecord) -> None:
        self._stages[key] = (folder, stage, ev)

    @staticmethod
    def link_stage(source: RunFolder, stage: StageRecord, dst: Path) -> None:
        """Copy a finished stage folder by hard links (its files are never modified)."""
        shutil.copytree(source.stage_dir(stage), dst, copy_function=_link_or_copy)


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


def run_sweep(exp: Experiment, store: RunStore, console: Console | None = None, mlflow: bool = False,
              on_stage: Callable[[RunFolder, StageRecord], None] | None = None,
              on_done: Callable[[RunFolder, RunResults, str | None], None] | None = None) -> list[Path]:
    """Run every point not already finished in `store`; returns the run folders in point order.

    A point whose run is marked `running` (a sweep killed mid-run) is redone from scratch.
    `on_stage` / `on_done` are passed to each point's run_experiment (presentation).
    """
    from factlab.experiment.runner import run_experiment

    from factlab.experiment.preflight import preflight_sweep

    console = console or Console(stderr=True)
    points = expand_sweep(exp)
    preflight_sweep(points, console)  # a bad later point fails now, not after earlier points trained
    root = Path(exp.output_dir) / exp.name
    folders: list[Path] = []
    cache = SweepCache()
    with progress_bar(console) as progress:
        task = progress.add_task(f"sweep {exp.name}", total=len(points))
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
                           label=p.label, mlflow=mlflow, cache=cache, on_stage=on_stage, on_done=on_done)
            folders.append(run_dir)
            progress.advance(task)
    return folders
