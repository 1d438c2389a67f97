"""The run folder: the one place that knows where a run's data lives and what shape it has.

::

    runs/<name>-<timestamp>/
      config.yaml                  the resolved experiment (absolute paths, seed)
      results.json                 RunResults: per stage the training record, per evaluation the
                                   probe summaries, perplexity, style and forgetting (rewritten
                                   atomically after every evaluation)
      scores/<label>.jsonl         one row per probe for each evaluation (label: base,
                                   base+context, or a stage name)
      scores/<label>.style.jsonl   the answers to the SFT training prompts
      scores/<label>.priming.jsonl the answers looked at for priming (locality probes, general
                                   prompts) and the trained names each contains
      stages/<i>-<name>/           adapter/ (PEFT), merged/ (plain transformers), train.json, loss.png

The runner writes through `RunFolder`; the run store, the report, `factlab compare` and
`factlab eval RUN_DIR` read through it. Reading is typed (`RunResults`, `StageRecord`,
`EvalRecord`) and migrates folders written by older versions. Nothing here imports torch, so
reports stay light.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factlab.errors import FactlabError

FORMAT = 2
"""results.json format written now. 1 (no `format` key): folders from before the run record
had an owner; they read the same way (see RunResults.from_json)."""

BASE = "base"
"""Label of the untrained model's evaluation; a stage cannot take this name (config checks)."""
CONTEXT = "+context"
"""Suffix of the in-context evaluation of the untrained model (base+context)."""


# ---------------------------------------------------------------------------------------
# Files


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, atomically. Raw Unicode is kept (ensure_ascii=False): readers
    must split on "\\n" only, since a string may hold U+2028 / U+2029 unescaped."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file written by `write_jsonl` (blank lines skipped).

    split("\\n"), not splitlines(): splitlines() also breaks at U+2028, U+2029, \\x1c-\\x1e and
    \\x85, which json.dumps(ensure_ascii=False) leaves raw inside strings (a sampled answer can
    contain them)."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise FactlabError(f"{path}:{lineno}: malformed JSON ({e.msg}); the file was cut short or edited, "
                               "run the evaluation again") from None
    return rows


# ---------------------------------------------------------------------------------------
# Records


@dataclass
class EvalRecord:
    """One evaluation of one model: the untrained model (`base`), the untrained model with the
    corpus in its prompt (`base+context`), or the model after a stage (the stage's name)."""

    label: str
    summaries: dict[str, dict] = field(default_factory=dict)
    """probe kind (and "all") -> metric -> summary, as evaluate.facts.summarize makes them."""
    perplexity: dict[str, dict] = field(default_factory=dict)
    """held-out text name -> {"perplexity", "n_tokens", ...}; empty for base+context."""
    style: dict | None = None
    """Answers to the SFT training prompts (style and chat format), when there were any."""
    forgetting: dict | None = None
    """Against the untrained model's evaluation; None for the untrained model itself."""
    priming: dict | None = None
    """Trained names in the answers to locality probes and general prompts
    (evaluate.priming.priming_record); None when not measured."""


@dataclass
class StageRecord:
    """What one training stage left in results.json: its name, its folder and what train_stage
    measured (steps, losses, tokens/s, trainable parameters, artefact, merged, ...)."""

    name: str
    folder: str
    """Relative to the run folder (stages/<i>-<name>)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Every field of train.stage.StageResult but the loss history (that is in train.json)."""
    reused_from: str | None = None
    """The stage folder of an earlier sweep point this one was hard-linked from."""

    def get(self, key: str, default: Any = None) -> Any:
        """A training metric by its StageResult field name."""
        return self.metrics.get(key, default)

    @property
    def merged(self) -> bool:
        return bool(self.metrics.get("merged"))

    def to_json(self) -> dict:
        out = {"name": self.name, **self.metrics, "folder": self.folder}
        if self.reused_from is not None:
            out["reused_from"] = self.reused_from
        return out


@dataclass
class RunResults:
    """A run's results.json as typed records, in evaluation order."""

    name: str = ""
    model: str = ""
    seed: int = 0
    stages: list[StageRecord] = field(default_factory=list)
    evaluations: dict[str, EvalRecord] = field(default_factory=dict)

    def add(self, ev: EvalRecord) -> None:
        """Add (or replace) an evaluation, keeping the order they were made in."""
        self.evaluations[ev.label] = ev

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def is_untrained(self, label: str) -> bool:
        """Whether an evaluation is of the untrained model (base, base+context): it is not the
        evaluation after one of this run's stages. Decided by what the label is, not by how it
        is spelt, so a stage may be called `baseline`."""
        return label not in self.stage_names

    @property
    def trained_labels(self) -> list[str]:
        """Labels of the evaluations after each stage, in stage order."""
        return [n for n in self.stage_names if n in self.evaluations]

    @property
    def untrained_labels(self) -> list[str]:
        return [label for label in self.evaluations if self.is_untrained(label)]

    # Views by label, the shape the tables and the run store read.
    @property
    def summaries(self) -> dict[str, dict]:
        return {label: ev.summaries for label, ev in self.evaluations.items()}

    @property
    def perplexity(self) -> dict[str, dict]:
        return {label: ev.perplexity for label, ev in self.evaluations.items()}

    @property
    def forgetting(self) -> dict[str, dict]:
        return {label: ev.forgetting for label, ev in self.evaluations.items() if ev.forgetting is not None}

    @property
    def style(self) -> dict[str, dict]:
        return {label: ev.style for label, ev in self.evaluations.items() if ev.style}

    @property
    def priming(self) -> dict[str, dict]:
        return {label: ev.priming for label, ev in self.evaluations.items() if ev.priming}

    def stage(self, name: str) -> StageRecord | None:
        return next((s for s in self.stages if s.name == name), None)

    def to_json(self) -> dict:
        """results.json's content (the layout every version has written, plus `format`)."""
        return {"format": FORMAT, "name": self.name, "model": self.model, "seed": self.seed,
                "stages": [s.to_json() for s in self.stages], "summaries": self.summaries,
                "perplexity": self.perplexity, "forgetting": self.forgetting, "style": self.style,
                "priming": self.priming}

    @classmethod
    def coerce(cls, results: RunResults | dict, source: str = "results") -> RunResults:
        """`results` as RunResults: records as they are, results.json's content parsed."""
        return results if isinstance(results, RunResults) else cls.from_json(results, source)

    @classmethod
    def from_json(cls, data: Any, source: str = "results.json") -> RunResults:
        """Parse (and migrate) results.json's content; FactlabError naming `source` when it
        has the wrong shape.

        Format 1 (before `format` was written) differs only in what may be missing: the
        per-evaluation sections of early runs (`forgetting`, `style`; `priming` is missing
        from runs of either format made before it was measured), and a stage's
        `folder`; an evaluation section once called `probes` is read as `summaries`."""

        def bad(what: str) -> FactlabError:
            return FactlabError(f"{source}: {what}; it is not a results.json written by factlab "
                                "(run the experiment again, or restore the file)")

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, found {type(data).__name__}")
        version = data.get("format", 1)
        if not isinstance(version, int):
            raise bad(f"'format' must be a number, found {version!r}")
        if version > FORMAT:
            raise FactlabError(f"{source}: format {version} is newer than this factlab reads ({FORMAT}); update factlab")
        if "summaries" not in data and isinstance(data.get("probes"), dict):
            data = {**data, "summaries": data["probes"]}  # migrate: the old in-memory name
        sections = {}
        for key in ("summaries", "perplexity", "forgetting", "style", "priming"):
            sec = data.get(key) or {}
            if not isinstance(sec, dict) or not all(isinstance(v, dict) or v is None for v in sec.values()):
                raise bad(f"'{key}' must map evaluation labels to objects")
            sections[key] = sec
        raw_stages = data.get("stages") or []
        if not isinstance(raw_stages, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                                       for s in raw_stages):
            raise bad("'stages' must be a list of objects with a 'name'")
        stages = []
        for i, s in enumerate(raw_stages):
            metrics = {k: v for k, v in s.items() if k not in ("name", "folder", "reused_from")}
            stages.append(StageRecord(name=s["name"], folder=s.get("folder") or RunFolder.stage_folder_name(i, s["name"]),
                                      metrics=metrics, reused_from=s.get("reused_from")))
        labels: list[str] = []
        for key in ("summaries", "perplexity", "forgetting", "style", "priming"):
            labels += [label for label in sections[key] if label not in labels]
        evaluations = {label: EvalRecord(label, summaries=sections["summaries"].get(label) or {},
                                         perplexity=sections["perplexity"].get(label) or {},
                                         style=sections["style"].get(label) or None,
                                         forgetting=sections["forgetting"].get(label),
                                         priming=sections["priming"].get(label) or None)
                       for label in labels}
        seed = data.get("seed", 0)
        return cls(name=str(data.get("name", "")), model=str(data.get("model", "")),
                   seed=seed if isinstance(seed, int) else 0, stages=stages, evaluations=evaluations)


# ---------------------------------------------------------------------------------------
# The folder


class RunFolder:
    """A run folder on disk: its paths, and reading and writing its records."""

    CONFIG = "config.yaml"
    RESULTS = "results.json"
    SCORES = "scores"
    STAGES = "stages"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def create(cls, root: Path, name: str) -> RunFolder:
        """A new, empty folder `<root>/<name>-<timestamp>` (numbered when that exists)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        root.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            d = root / (f"{name}-{stamp}" + (f"-{i}" if i else ""))
            try:
                d.mkdir()
                return cls(d)
            except FileExistsError:
                continue
        raise FactlabError(f"cannot create a run folder under {root}")

    @staticmethod
    def is_run(path: str | Path) -> bool:
        """Whether `path` holds a run that has written its results (a finished or partial run)."""
        return (Path(path) / RunFolder.RESULTS).is_file()

    # --- paths ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def results_path(self) -> Path:
        return self.path / self.RESULTS

    def scores_path(self, label: str) -> Path:
        return self.path / self.SCORES / f"{label}.jsonl"

    def style_path(self, label: str) -> Path:
        return self.path / self.SCORES / f"{label}.style.jsonl"

    def priming_path(self, label: str) -> Path:
        return self.path / self.SCORES / f"{label}.priming.jsonl"

    @staticmethod
    def stage_folder_name(index: int, name: str) -> str:
        """stages/<i>-<name>, relative to the run folder, numbered from 1."""
        return f"{RunFolder.STAGES}/{index + 1}-{name}"

    def stage_path(self, index: int, name: str) -> Path:
        """Where stage `index` (0-based) named `name` is (or will be) saved."""
        return self.path / self.stage_folder_name(index, name)

    def stage_dir(self, stage: StageRecord) -> Path:
        return self.path / stage.folder

    # --- config --------------------------------------------------------------------------
    def write_config(self, text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config_path, text)

    def read_config(self) -> dict:
        """The resolved experiment as a dict ({} when the folder has no config.yaml)."""
        import yaml

        if not self.config_path.is_file():
            return {}
        try:
            cfg = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise FactlabError(f"{self.config_path}: not UTF-8 text; restore the file") from None
        except yaml.YAMLError as e:
            problem = str(getattr(e, "problem", None) or e).splitlines()[0]
            raise FactlabError(f"{self.config_path}: not valid YAML ({problem}); restore the file") from None
        if not isinstance(cfg, dict):
            raise FactlabError(f"{self.config_path}: expected a mapping; restore the file")
        return cfg

    # --- results -------------------------------------------------------------------------
    def write_results(self, results: RunResults) -> None:
        """results.json, atomically: a run killed at any point leaves the previous version."""
        write_atomic(self.results_path, json.dumps(results.to_json(), indent=2))

    def read_results(self) -> RunResults:
        """results.json as records; FactlabError (one line, naming the file) when it is
        missing, cut short or of the wrong shape."""
        path = self.results_path
        if not path.is_file():
            raise FactlabError(f"{self.path} is not a run folder (no {self.RESULTS}); give a folder under runs/")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FactlabError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); the file was cut short or "
                               "edited: run the experiment again, or restore the file") from None
        except UnicodeDecodeError:
            raise FactlabError(f"{path}: not UTF-8 text; restore the file") from None
        return RunResults.from_json(data, source=str(path))

    # --- per-probe scores ----------------------------------------------------------------
    def write_scores(self, label: str, rows: list[dict]) -> None:
        self.scores_path(label).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(self.scores_path(label), rows)

    def read_scores(self, label: str) -> list[dict]:
        """The per-probe rows of one evaluation ([] when it wrote none)."""
        path = self.scores_path(label)
        return read_jsonl(path) if path.is_file() else []

    def write_style(self, label: str, rows: list[dict]) -> None:
        self.style_path(label).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(self.style_path(label), rows)

    def read_style(self, label: str) -> list[dict]:
        path = self.style_path(label)
        return read_jsonl(path) if path.is_file() else []

    def write_priming(self, label: str, rows: list[dict]) -> None:
        self.priming_path(label).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(self.priming_path(label), rows)

    def read_priming(self, label: str) -> list[dict]:
        path = self.priming_path(label)
        return read_jsonl(path) if path.is_file() else []

    def copy_scores(self, source: RunFolder, label: str) -> None:
        """Copy one evaluation's score files (rows, style and priming answers) from another run."""
        for src, dst in ((source.scores_path(label), self.scores_path(label)),
                         (source.style_path(label), self.style_path(label)),
                         (source.priming_path(label), self.priming_path(label))):
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)

    # --- stages --------------------------------------------------------------------------
    def loss_history(self, stage: StageRecord) -> list[dict]:
        """The stage's logged losses ({"step", "loss"} and {"step", "eval_loss"}) from train.json."""
        path = self.stage_dir(stage) / "train.json"
        if not path.is_file():
            return []
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("loss_history", [])
        except (json.JSONDecodeError, AttributeError):
            raise FactlabError(f"{path}: not a train.json written by factlab; restore the file") from None

    def loss_plot_path(self, stage: StageRecord) -> Path:
        """The stage's loss curve (drawn by report.plots.plot_stage_loss)."""
        return self.stage_dir(stage) / "loss.png"

    def merged_model(self, stage: StageRecord) -> Path | None:
        """The stage's merged model folder, when it saved one."""
        path = self.stage_dir(stage) / "merged"
        return path if (path / "config.json").is_file() else None

    def adapter(self, stage: StageRecord) -> Path | None:
        """The stage's adapter folder (PEFT format), when it saved one."""
        path = self.stage_dir(stage) / "adapter"
        return path if (path / "adapter_config.json").is_file() else None
