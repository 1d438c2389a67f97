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

An influence run (`factlab influence`) is a run folder of another kind, written whole under
``<name>-influence-<timestamp>.partial`` and renamed when complete (`RunFolder.staged`):

    runs/<name>-influence-<timestamp>/
      config.yaml                  the resolved experiment
      samples.jsonl                every row and column sample: id, role (row / column / both),
                                   prompt, target, group, meta
      eif.npz                      InfluenceMatrices: eif (S, R, C) per seed, eif_mean (R, C),
                                   base_loss (S, C), train_loss (S, R, steps), row_seconds (S, R),
                                   row_ids, col_ids, seeds; with in_context also eif_ctx (R, C)
      eif.csv                      the seed-mean matrix: first column the row id, one column per
                                   column id
      eif.jsonl                    one line per seed and row: {"seed", "row", "values": {col id: EIF}}
      eif_ctx.csv, eif_ctx.jsonl   the in-context matrix, same layout (no seed)
      heatmap.png, heatmap_ctx.png the two matrices drawn (influence.study.heatmap)
      results.json                 InfluenceResults: kind "influence", settings, timing, and the
                                   desiderata for fine-tuning and in-context side by side

The runner and the influence study write through `RunFolder`; the run store, the report, the
CLI (`factlab compare`, `eval RUN_DIR`, `export --verify`) read through it. Reading is typed
(`RunResults`, `StageRecord`, `EvalRecord`; `InfluenceResults`, `InfluenceMatrices`) and
migrates folders written by older versions. Nothing here imports torch, so reports stay light.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factlab.errors import FactlabError

if TYPE_CHECKING:
    import numpy as np

FORMAT = 2
"""results.json format written now. 1 (no `format` key): folders from before the run record
had an owner; they read the same way (see RunResults.from_json)."""

BASE = "base"
"""Label of the untrained model's evaluation; a stage cannot take this name (config checks)."""
CONTEXT = "+context"
"""Suffix of the in-context evaluation of the untrained model (base+context)."""
INFLUENCE = "influence"
"""The `kind` an influence run's results carry (a training run's carry none)."""


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


def _matrix_csv(path: Path, M: np.ndarray, row_ids: list[str], col_ids: list[str]) -> None:
    """A matrix as CSV: a header `row, <col ids>`, then per row its id and repr(float) values
    (repr: the CSV reads back to the same doubles)."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["row"] + col_ids)
        for rid, vals in zip(row_ids, M):
            w.writerow([rid] + [repr(float(v)) for v in vals])


def _matrix_jsonl(path: Path, mats: list[tuple[int | None, np.ndarray]], row_ids: list[str], col_ids: list[str]) -> None:
    """Matrices as JSONL, one line per (seed, row): {"seed", "row", "values": {col id: value}}
    ("seed" left out when it is None)."""
    write_jsonl(path, [({"seed": seed} if seed is not None else {}) | {"row": rid, "values": dict(zip(col_ids, map(float, vals)))}
                       for seed, M in mats for rid, vals in zip(row_ids, M)])


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
        if data.get("kind") == INFLUENCE:
            raise FactlabError(f"{source}: an influence run's results (factlab influence), not a training run's; "
                               "give a run of `factlab run` (`factlab report` reads influence runs)")
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
# Influence records


def _bad_influence(source: str, what: str) -> FactlabError:
    return FactlabError(f"{source}: {what}; it is not an influence results.json written by factlab "
                        "(run `factlab influence` again, or restore the file)")


def _typed(data: dict, key: str, kinds: tuple[type, ...], default: Any, source: str, what: str) -> Any:
    """data[key] when it is of one of `kinds` (or None, or missing: then `default`); else
    FactlabError naming the key. bool is not a number here."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _bad_influence(source, f"'{key}' must be {what}, found {value!r}")
    return value


_NUM = (int, float)


@dataclass
class InfluenceSchedule:
    """The per-sample fine-tuning schedule of an influence run (influence.exact.Schedule's
    settings, as results.json records them)."""

    steps: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None

    @classmethod
    def from_json(cls, data: dict, source: str) -> InfluenceSchedule:
        return cls(steps=_typed(data, "steps", (int,), None, source, "an integer"),
                   lr=_typed(data, "lr", _NUM, None, source, "a number"),
                   optimizer=_typed(data, "optimizer", (str,), None, source, "a name"),
                   weight_decay=_typed(data, "weight_decay", _NUM, None, source, "a number"),
                   max_grad_norm=_typed(data, "max_grad_norm", _NUM, None, source, "a number"))


@dataclass
class InfluenceTiming:
    """Wall and CPU seconds of the two matrices (None for an in-context matrix not made), and
    torch's thread count."""

    finetune_seconds: float | None = None
    finetune_seconds_per_row: float | None = None
    finetune_cpu_seconds: float | None = None
    in_context_seconds: float | None = None
    in_context_seconds_per_row: float | None = None
    in_context_cpu_seconds: float | None = None
    threads: int | None = None

    @classmethod
    def from_json(cls, data: dict, source: str) -> InfluenceTiming:
        return cls(**{f.name: _typed(data, f.name, (int,) if f.name == "threads" else _NUM, None, source,
                                     "an integer" if f.name == "threads" else "a number")
                      for f in fields(cls)})


Interval = dict
"""{n, value, ci_low, ci_high}, the shape influence.desiderata's intervals have (value and the
bounds None when there was nothing to measure)."""


@dataclass
class InfluenceDesiderata:
    """The desiderata of an influence run, each keyed by its name (symmetry, sparsity,
    distance_*, noise_<level>, transitive*, containment_*; see influence.study.desiderata):
    an Interval, or None when the sample set has no such structure."""

    finetune: dict[str, Interval | None] = field(default_factory=dict)
    """On the seed-mean fine-tuning matrix."""
    finetune_per_seed: dict[str, list[float | None]] | None = None
    """With several seeds: each seed's value."""
    finetune_over_seeds: dict[str, Interval] | None = None
    """With several seeds: the mean of the per-seed values, bootstrapped over seeds."""
    in_context: dict[str, Interval | None] | None = None
    """On the in-context matrix, when it was made."""

    def to_json(self) -> dict:
        out: dict[str, Any] = {"finetune": self.finetune}
        for key in ("finetune_per_seed", "finetune_over_seeds", "in_context"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str) -> InfluenceDesiderata:
        if not isinstance(data, dict) or not isinstance(data.get("finetune"), dict):
            raise _bad_influence(source, "'desiderata' must be an object with a 'finetune' object")
        for key in ("finetune", "finetune_over_seeds", "in_context"):
            sec = data.get(key)
            if sec is not None and (not isinstance(sec, dict)
                                    or not all(isinstance(v, dict) or v is None for v in sec.values())):
                raise _bad_influence(source, f"'desiderata.{key}' must map names to intervals")
        per_seed = data.get("finetune_per_seed")
        if per_seed is not None and (not isinstance(per_seed, dict)
                                     or not all(isinstance(v, list) for v in per_seed.values())):
            raise _bad_influence(source, "'desiderata.finetune_per_seed' must map names to lists")
        return cls(finetune=data["finetune"], finetune_per_seed=per_seed,
                   finetune_over_seeds=data.get("finetune_over_seeds"), in_context=data.get("in_context"))


@dataclass
class InfluenceResults:
    """An influence run's results.json as a typed record (the field order is the file's)."""

    name: str = ""
    model: str = ""
    sample_set: str = ""
    """The sample set's kind: chain, containment, pairs, world, corpus, ..."""
    n_rows: int = 0
    """Rows: the clean training samples, then their noised copies."""
    n_clean_rows: int = 0
    n_columns: int = 0
    seeds: list[int] = field(default_factory=list)
    schedule: InfluenceSchedule = field(default_factory=InfluenceSchedule)
    peft: dict[str, Any] = field(default_factory=dict)
    """The adapter, as config.PeftSpec dumps it (method, targets, r, alpha, ...)."""
    trainable_params: int | None = None
    sparsity_k: int | None = None
    """The k of the sparsity desideratum (influence.study.sparsity_k)."""
    timing: InfluenceTiming = field(default_factory=InfluenceTiming)
    desiderata: InfluenceDesiderata = field(default_factory=InfluenceDesiderata)

    def to_json(self) -> dict:
        """results.json's content: the layout every version has written."""
        return {"kind": INFLUENCE, "name": self.name, "model": self.model, "sample_set": self.sample_set,
                "n_rows": self.n_rows, "n_clean_rows": self.n_clean_rows, "n_columns": self.n_columns,
                "seeds": self.seeds, "schedule": asdict(self.schedule), "peft": self.peft,
                "trainable_params": self.trainable_params, "sparsity_k": self.sparsity_k,
                "timing": asdict(self.timing), "desiderata": self.desiderata.to_json()}

    @classmethod
    def from_json(cls, data: Any, source: str = "results.json") -> InfluenceResults:
        """Parse results.json's content; FactlabError naming `source` when it has the wrong
        shape. What early influence runs did not record reads as its default (None, 0, "")."""
        if not isinstance(data, dict):
            raise _bad_influence(source, f"expected a JSON object, found {type(data).__name__}")
        if data.get("kind") != INFLUENCE:
            raise FactlabError(f"{source}: not an influence run's results (no \"kind\": \"influence\"); "
                               "give a folder written by `factlab influence`")

        def section(key: str) -> dict:
            return _typed(data, key, (dict,), {}, source, "an object")

        seeds = _typed(data, "seeds", (list,), [], source, "a list of integers")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
            raise _bad_influence(source, f"'seeds' must be a list of integers, found {seeds!r}")
        return cls(name=str(data.get("name", "")), model=str(data.get("model", "")),
                   sample_set=str(data.get("sample_set") or ""),
                   n_rows=_typed(data, "n_rows", (int,), 0, source, "an integer"),
                   n_clean_rows=_typed(data, "n_clean_rows", (int,), 0, source, "an integer"),
                   n_columns=_typed(data, "n_columns", (int,), 0, source, "an integer"),
                   seeds=seeds, schedule=InfluenceSchedule.from_json(section("schedule"), source),
                   peft=section("peft"),
                   trainable_params=_typed(data, "trainable_params", (int,), None, source, "an integer"),
                   sparsity_k=_typed(data, "sparsity_k", (int,), None, source, "an integer"),
                   timing=InfluenceTiming.from_json(section("timing"), source),
                   desiderata=InfluenceDesiderata.from_json(data.get("desiderata"), source))


@dataclass
class InfluenceMatrices:
    """The matrices of an influence run (eif.npz), in nats per token: EIF[i, j] = L_j(after
    training on row i) − L_j(before). Arrays a folder did not save read as None."""

    eif_mean: np.ndarray
    """(R, C): the mean over seeds."""
    row_ids: list[str]
    col_ids: list[str]
    eif: np.ndarray | None = None
    """(S, R, C): per seed."""
    base_loss: np.ndarray | None = None
    """(S, C): L_j before training, per seed."""
    train_loss: np.ndarray | None = None
    """(S, R, steps): row i's loss before each optimizer step."""
    row_seconds: np.ndarray | None = None
    """(S, R): wall time of each row."""
    seeds: list[int] = field(default_factory=list)
    eif_ctx: np.ndarray | None = None
    """(R, C): the in-context matrix (the row's text in the prompt), when it was made."""

    def arrays(self) -> dict[str, np.ndarray]:
        """eif.npz's arrays, in the order the file has always had them."""
        import numpy as np

        out = {"eif": self.eif, "eif_mean": self.eif_mean, "base_loss": self.base_loss, "train_loss": self.train_loss,
               "row_seconds": self.row_seconds, "row_ids": np.array(self.row_ids), "col_ids": np.array(self.col_ids),
               "seeds": np.array(self.seeds), "eif_ctx": self.eif_ctx}
        return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------------------
# The folder


class RunFolder:
    """A run folder on disk: its paths, and reading and writing its records."""

    CONFIG = "config.yaml"
    RESULTS = "results.json"
    SCORES = "scores"
    STAGES = "stages"
    SAMPLES = "samples.jsonl"
    MATRICES = "eif.npz"
    PARTIAL = ".partial"

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

    @classmethod
    @contextmanager
    def staged(cls, root: Path, name: str) -> Iterator[RunFolder]:
        """A run folder written whole (an influence run): yields `<root>/<name>-<timestamp>.partial`
        (numbered when that or its final name exists) and renames it to its final name when
        the block ends; on any exception (Ctrl-C included) removes it, so a failed or
        interrupted run leaves nothing behind. The folder's `path` is the final one afterwards."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        root.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            final = root / (f"{name}-{stamp}" + (f"-{i}" if i else ""))
            partial = final.with_name(final.name + cls.PARTIAL)
            if final.exists():
                continue
            try:
                partial.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise FactlabError(f"cannot choose a run folder name under {root}")
        folder = cls(partial)
        try:
            yield folder
            # os.rename of a folder fails on a non-empty target: a run never lands inside another
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        folder.path = final

    @staticmethod
    def is_run(path: str | Path) -> bool:
        """Whether `path` holds a run that has written its results (a finished or partial run)."""
        return (Path(path) / RunFolder.RESULTS).is_file()

    def is_influence(self) -> bool:
        """Whether the folder holds an influence run (results of kind influence); False when its
        results are missing or unreadable."""
        try:
            return json.loads(self.results_path.read_text(encoding="utf-8")).get("kind") == INFLUENCE
        except (OSError, ValueError, AttributeError):
            return False

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

    def _results_json(self) -> Any:
        path = self.results_path
        if not path.is_file():
            raise FactlabError(f"{self.path} is not a run folder (no {self.RESULTS}); give a folder under runs/")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FactlabError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); the file was cut short or "
                               "edited: run the experiment again, or restore the file") from None
        except UnicodeDecodeError:
            raise FactlabError(f"{path}: not UTF-8 text; restore the file") from None

    def read_results(self) -> RunResults:
        """results.json as records; FactlabError (one line, naming the file) when it is
        missing, cut short or of the wrong shape, or is an influence run's."""
        return RunResults.from_json(self._results_json(), source=str(self.results_path))

    def read_record(self) -> RunResults | InfluenceResults:
        """The results of either kind of run (a training run's, or an influence run's)."""
        data = self._results_json()
        if isinstance(data, dict) and data.get("kind") == INFLUENCE:
            return InfluenceResults.from_json(data, source=str(self.results_path))
        return RunResults.from_json(data, source=str(self.results_path))

    # --- influence runs ------------------------------------------------------------------
    def write_influence(self, results: InfluenceResults) -> None:
        """An influence run's results.json (written last: inside `staged`, a folder with one is
        complete)."""
        write_atomic(self.results_path, json.dumps(results.to_json(), indent=2, ensure_ascii=False))

    def read_influence(self) -> InfluenceResults:
        """An influence run's results.json as a record; FactlabError (one line, naming the file)
        when it is missing, unreadable or not an influence run's."""
        return InfluenceResults.from_json(self._results_json(), source=str(self.results_path))

    @property
    def samples_path(self) -> Path:
        return self.path / self.SAMPLES

    def write_samples(self, rows: list[dict]) -> None:
        """samples.jsonl: {"id", "role", "prompt", "target", "group", "meta"} per sample."""
        write_jsonl(self.samples_path, rows)

    def read_samples(self) -> list[dict]:
        return read_jsonl(self.samples_path) if self.samples_path.is_file() else []

    @property
    def matrices_path(self) -> Path:
        return self.path / self.MATRICES

    def matrix_table_path(self, in_context: bool = False, ext: str = "csv") -> Path:
        """eif.csv / eif.jsonl, or eif_ctx.csv / eif_ctx.jsonl for the in-context matrix."""
        return self.path / f"eif{'_ctx' if in_context else ''}.{ext}"

    def heatmap_path(self, in_context: bool = False) -> Path:
        """heatmap.png (the fine-tuning matrix) or heatmap_ctx.png (the in-context one)."""
        return self.path / f"heatmap{'_ctx' if in_context else ''}.png"

    def write_matrices(self, m: InfluenceMatrices) -> None:
        """eif.npz, and each matrix as CSV (the seed mean) and JSONL (per seed and row)."""
        import numpy as np

        np.savez_compressed(self.matrices_path, **m.arrays())
        _matrix_csv(self.matrix_table_path(), m.eif_mean, m.row_ids, m.col_ids)
        if m.eif is not None:
            _matrix_jsonl(self.matrix_table_path(ext="jsonl"), list(zip(m.seeds, m.eif)), m.row_ids, m.col_ids)
        if m.eif_ctx is not None:
            _matrix_csv(self.matrix_table_path(True), m.eif_ctx, m.row_ids, m.col_ids)
            _matrix_jsonl(self.matrix_table_path(True, "jsonl"), [(None, m.eif_ctx)], m.row_ids, m.col_ids)

    def read_matrices(self) -> InfluenceMatrices:
        """eif.npz as InfluenceMatrices; FactlabError (one line, naming the file) when it is
        missing or not a matrix file of an influence run."""
        import zipfile

        import numpy as np

        path = self.matrices_path
        if not path.is_file():
            raise FactlabError(f"{path} is missing; the influence run is incomplete: run `factlab influence` again")
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise FactlabError(f"{path}: not a matrix file written by factlab ({e}); restore it or run "
                               "`factlab influence` again") from None
        missing = [k for k in ("eif_mean", "row_ids", "col_ids") if k not in arrays]
        if missing:
            raise FactlabError(f"{path}: no {', '.join(missing)}; restore it or run `factlab influence` again")
        return InfluenceMatrices(eif_mean=arrays["eif_mean"], row_ids=[str(x) for x in arrays["row_ids"]],
                                 col_ids=[str(x) for x in arrays["col_ids"]], eif=arrays.get("eif"),
                                 base_loss=arrays.get("base_loss"), train_loss=arrays.get("train_loss"),
                                 row_seconds=arrays.get("row_seconds"),
                                 seeds=[int(x) for x in arrays["seeds"]] if "seeds" in arrays else [],
                                 eif_ctx=arrays.get("eif_ctx"))

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
