"""The paper's small-network experiment on scikit-learn's handwritten digits.

Matelsky, Ungar & Kording (2024) contrast a small CNN, whose empirical influences come out
roughly symmetric (the network stays close to its linearisation, the NTK regime, where
EIF[i, j] ≈ −lr ∇L_j·∇L_i is symmetric by construction), with an LLM, whose influences do not.
This module reruns that on ``sklearn.datasets.load_digits`` (8×8 grey images, 1,797 of them,
shipped inside the scikit-learn wheel: no download):

1. Hold out ``per_class`` images of each class in ``classes`` (seeded); pretrain a small CNN
   (10 outputs) on the remaining images of ``pretrain_classes`` only. The default pretrains on
   0-4 and fine-tunes on all ten digits, so half the fine-tune samples teach a class the
   network has never been trained to output (the LLM analogue: a new fact) and half refine a
   known one (a known fact), and within-class structure can show up on both sides.
2. For each noise level, for each held-out sample i: restore the pretrained weights in memory,
   fresh optimizer, ``steps`` steps on sample i alone (its pixels with Gaussian noise of std
   ``pixel`` added, its label replaced by another class with probability ``label``), then the
   cross-entropy of every clean held-out sample j in one batched forward:
   EIF[i, j] = L_j(θ_i) − L_j(θ_0) (negative = training on i helped j), the same convention
   as the LLM matrix. Rows and columns are ordered by class.
3. Per level: symmetry (``desiderata.symmetry_interval``), within-class vs across-class mean
   influence with intervals (``desiderata.group_means`` + ``mean_interval``; a sample with
   itself left out), the self-influence, and for noised levels the per-row correlation with the
   clean level's row (noise invariance). One heatmap PNG with a panel per level.

Run it with ``python -m factlab.influence.digits EXPERIMENT.yaml`` (reads the yaml's
``influence.digits`` block), or call :func:`run_digits`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factlab.errors import FactlabError

if TYPE_CHECKING:
    import torch
    from rich.console import Console


class _Strict(BaseModel):
    # as the experiment schema (config._Strict): no unknown keys, `true` is not a number, no inf/nan
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class NoiseLevel(_Strict):
    """One noise condition of the training rows (columns are always the clean samples)."""

    pixel: float = Field(0.0, ge=0.0)
    """Std of Gaussian noise added to the pixels (pixels scaled to [0, 1]; clipped back)."""
    label: float = Field(0.0, ge=0.0, le=1.0)
    """Probability that a row's label is replaced by a different class, drawn uniformly."""

    @property
    def name(self) -> str:
        return "clean" if not self.pixel and not self.label else \
            "+".join(p for p in (f"pixel{self.pixel:g}" if self.pixel else "", f"label{self.label:g}" if self.label else "") if p)


class DigitsSpec(_Strict):
    """The digits experiment (``influence: {task: digits, digits: {...}}``)."""

    pretrain_classes: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    """Digits the CNN is pretrained on (its head always has 10 outputs)."""
    classes: list[int] = Field(default_factory=lambda: list(range(10)), min_length=2)
    """Digits of the held-out fine-tune samples (rows and columns of the matrix)."""
    per_class: int = Field(10, ge=1, le=50)
    """Held-out samples per class (never seen in pretraining)."""
    noise: list[NoiseLevel] = Field(default_factory=lambda: [NoiseLevel(), NoiseLevel(pixel=0.25),
                                                             NoiseLevel(pixel=0.5), NoiseLevel(label=0.5)],
                                    min_length=1)
    """Noise levels of the training rows; one matrix each."""
    pretrain_epochs: int = Field(8, ge=1)
    """Enough for 100% on the pretraining test split without saturating: at 30 epochs the known
    digits' losses are ~1e-6 and a step on them moves nothing measurable."""
    pretrain_lr: float = Field(3e-3, gt=0)
    """Adam learning rate of the pretraining (batch 64)."""
    steps: int = Field(1, ge=1)
    """Optimizer steps of each single-sample fine-tune."""
    lr: float = Field(0.005, gt=0)
    """Fine-tune learning rate: small enough that one step changes a column loss by a few nats at most."""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """Fine-tune optimizer: plain SGD (as in the NTK picture) or Adam; fresh for every row."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seeds the held-out split, the pretraining and the noise (numpy takes 0 to 2**32 - 1)."""

    @model_validator(mode="after")
    def _check(self) -> "DigitsSpec":
        for key in ("pretrain_classes", "classes"):
            vals = getattr(self, key)
            bad = [c for c in vals if not 0 <= c <= 9]
            if bad:
                raise ValueError(f"{key} are digits 0-9, got {bad[0]}")
            if len(set(vals)) != len(vals):
                raise ValueError(f"{key} lists a digit twice")
        return self


def load_spec(block: dict | None) -> DigitsSpec:
    """A DigitsSpec from the yaml's ``influence.digits`` block; bad keys or values raise a
    one-line FactlabError naming the key."""
    try:
        return DigitsSpec(**(block or {}))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise FactlabError(f"influence.digits{'.' + where if where else ''}: {msg}") from None
    except TypeError as e:
        raise FactlabError(f"influence.digits must be a mapping of settings: {e}") from None


# ---------------------------------------------------------------------------------------
# Data and network


def load_split(spec: DigitsSpec) -> dict[str, np.ndarray]:
    """The digits split: held-out samples (``per_class`` of each of ``classes``, ordered by class)
    and the pretraining images (the other images of ``pretrain_classes``). Images (N, 1, 8, 8)
    float32 in [0, 1], labels (N,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8); raw pixels are 0..16
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(spec.seed)
    held = []
    for c in spec.classes:
        idx = np.flatnonzero(y == c)
        if spec.per_class > idx.size:
            raise FactlabError(f"influence.digits.per_class {spec.per_class} exceeds the {idx.size} images of digit {c}")
        held.extend(sorted(rng.choice(idx, spec.per_class, replace=False)))
    held = np.array(held)
    pre = np.setdiff1d(np.flatnonzero(np.isin(y, spec.pretrain_classes)), held)
    pre = rng.permutation(pre)
    n_test = max(1, pre.size // 10)  # a pretraining test split, for the accuracy sanity number
    return {"x_held": X[held], "y_held": y[held], "held_index": held,
            "x_pre": X[pre[n_test:]], "y_pre": y[pre[n_test:]], "x_test": X[pre[:n_test]], "y_test": y[pre[:n_test]]}


def make_cnn() -> torch.nn.Module:
    """A small CNN for 8×8 digits: (B, 1, 8, 8) → conv 16 → conv 32 → pool (B, 32, 4, 4) →
    64 → 10 logits; about 42k parameters."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def pretrain(spec: DigitsSpec, split: dict, console: Console | None = None) -> tuple[torch.nn.Module, float]:
    """The CNN trained on the pretraining images (Adam, batch 64, seeded); returns (model in
    eval mode, accuracy on the pretraining test split)."""
    import torch

    torch.manual_seed(spec.seed)
    net = make_cnn()
    x, y = torch.from_numpy(split["x_pre"]), torch.from_numpy(split["y_pre"])
    opt = torch.optim.Adam(net.parameters(), lr=spec.pretrain_lr)
    gen = torch.Generator().manual_seed(spec.seed)
    net.train()
    for _ in range(spec.pretrain_epochs):
        for b in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.from_numpy(split["x_test"])).argmax(1) == torch.from_numpy(split["y_test"])).float().mean())
    return net, acc


def noised_rows(spec: DigitsSpec, level: NoiseLevel, x: np.ndarray, y: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The training rows at ``level``: pixels plus N(0, pixel²) clipped to [0, 1]; each label
    replaced with probability ``label`` by a uniformly drawn other digit. Seeded by the spec's
    seed and the level's position ``index``."""
    rng = np.random.default_rng([spec.seed, index])
    xn = np.clip(x + rng.normal(0.0, level.pixel, size=x.shape), 0.0, 1.0).astype(np.float32) if level.pixel else x.copy()
    yn = y.copy()
    flip = rng.random(len(y)) < level.label
    for k in np.flatnonzero(flip):
        yn[k] = rng.choice([c for c in range(10) if c != y[k]])
    return xn, yn


class DigitsRowTrainer:
    """Snapshot the pretrained CNN's state dict once; ``fit`` restores it in memory, builds a
    fresh optimizer and trains on one sample (the principle of ``influence.exact.RowTrainer``)."""

    def __init__(self, net: torch.nn.Module, spec: DigitsSpec):
        self.net, self.spec = net, spec
        self.snapshot = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def reset(self) -> None:
        self.net.load_state_dict(self.snapshot)
        for p in self.net.parameters():
            p.grad = None

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x (1, 1, 8, 8), y (1,): reset, then ``steps`` steps on this sample alone."""
        import torch

        self.reset()
        s = self.spec
        params = list(self.net.parameters())
        opt = torch.optim.SGD(params, lr=s.lr) if s.optimizer == "sgd" else torch.optim.Adam(params, lr=s.lr)
        for _ in range(s.steps):  # no dropout/batch norm in make_cnn: train/eval mode are the same
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(self.net(x), y).backward()
            opt.step()


def column_losses(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Cross-entropy of every column sample, (C,) float64, one batched forward."""
    import torch

    with torch.no_grad():
        return torch.nn.functional.cross_entropy(net(x), y, reduction="none").double().numpy()


def eif_matrix(trainer: DigitsRowTrainer, x_rows: np.ndarray, y_rows: np.ndarray, x_cols: np.ndarray,
               y_cols: np.ndarray, progress=None, task=None) -> np.ndarray:
    """(R, C) EIF: row i trained on (x_rows[i], y_rows[i]) alone, every column scored."""
    import torch

    xc, yc = torch.from_numpy(x_cols), torch.from_numpy(y_cols)
    trainer.reset()
    base = column_losses(trainer.net, xc, yc)
    M = np.zeros((len(x_rows), len(x_cols)))
    for i in range(len(x_rows)):
        trainer.fit(torch.from_numpy(x_rows[i:i + 1]), torch.from_numpy(y_rows[i:i + 1]))
        M[i] = column_losses(trainer.net, xc, yc) - base
        if progress is not None:
            progress.update(task, advance=1)
    trainer.reset()
    return M


# ---------------------------------------------------------------------------------------
# Metrics, figure, entry point


def class_split(M: np.ndarray, row_classes: np.ndarray, col_classes: np.ndarray, seed: int = 0) -> dict:
    """Within-class vs across-class influence of a square matrix over the same samples (a
    sample with itself left out): ``within`` and ``across`` mean entries with intervals and
    ``difference`` = within − across (negative: a sample helps its own class more)."""
    from factlab.influence.desiderata import group_means, mean_interval

    g = group_means(M, [str(c) for c in row_classes], [str(c) for c in col_classes], same_sample=lambda i, j: i == j)
    within, across = mean_interval(g["same"], seed=seed), mean_interval(g["different"], seed=seed)
    # Interval of the difference: bootstrap the two sets of entries independently.
    rng = np.random.default_rng(seed)
    a, b = np.asarray(g["same"]), np.asarray(g["different"])
    diff = None
    if a.size and b.size:
        boots = [a[rng.integers(0, a.size, a.size)].mean() - b[rng.integers(0, b.size, b.size)].mean()
                 for _ in range(1000)]
        lo, hi = np.quantile(boots, [0.025, 0.975])
        diff = {"n": int(a.size + b.size), "value": float(a.mean() - b.mean()), "ci_low": float(lo), "ci_high": float(hi)}
    return {"within": within, "across": across, "difference": diff}


def _row_correlation(A: np.ndarray, B: np.ndarray) -> list[float]:
    out = []
    for a, b in zip(A, B):
        out.append(float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else float("nan"))
    return out


def plot(path: Path, mats: dict[str, np.ndarray], classes: np.ndarray) -> None:
    """One panel per noise level: the EIF matrix ordered by class, 0 white, blue = helped,
    thin lines at class boundaries, each panel on its own symmetric colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(mats)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    bounds = np.flatnonzero(np.diff(classes)) + 0.5
    centers = [float(np.mean(np.flatnonzero(classes == c))) for c in dict.fromkeys(classes)]
    for ax, (name, M) in zip(axes[0], mats.items()):
        lim = float(np.abs(M).max()) or 1.0
        im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        for b in bounds:
            ax.axhline(b, color="k", lw=0.3)
            ax.axvline(b, color="k", lw=0.3)
        ax.set_xticks(centers, [str(c) for c in dict.fromkeys(classes)], fontsize=7)
        ax.set_yticks(centers, [str(c) for c in dict.fromkeys(classes)], fontsize=7)
        ax.set_title(f"rows: {name}", fontsize=9)
        ax.set_xlabel("scored (clean) sample j, by digit")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    axes[0][0].set_ylabel("fine-tuned on sample i, by digit")
    fig.suptitle("digits CNN: EIF[i, j] = ΔCE_j after one-sample fine-tune on i", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_digits(cfg: DigitsSpec, out_dir: Path, console: Console | None = None) -> dict:
    """Run the experiment, write ``digits.json`` (spec, metrics, seconds), ``digits-eif.npz``
    (one (N, N) matrix per level, labels, dataset indices) and ``digits-eif.png`` into
    ``out_dir``; returns the metrics dict."""
    import torch

    from factlab.influence.desiderata import mean_interval, symmetry_interval
    from factlab.influence.exact import deterministic, progress_bar

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    split = load_split(cfg)
    with deterministic():
        net, acc = pretrain(cfg, split, console)
        t_pre = time.perf_counter() - t0
        trainer = DigitsRowTrainer(net, cfg)
        x, y = split["x_held"], split["y_held"]
        mats, levels = {}, {}
        with progress_bar(console) as progress:
            task = progress.add_task("digits rows", total=len(cfg.noise) * len(x), rate="")
            for k, level in enumerate(cfg.noise):
                t_lvl = time.perf_counter()
                xr, yr = noised_rows(cfg, level, x, y, k)
                M = eif_matrix(trainer, xr, yr, x, y, progress, task)
                name = level.name if level.name not in mats else f"{level.name}#{k}"
                mats[name] = M
                entry = {"pixel": level.pixel, "label": level.label, "labels_flipped": int((yr != y).sum()),
                         "symmetry": symmetry_interval(M, seed=cfg.seed),
                         "class": class_split(M, y, y, cfg.seed),
                         "self_influence": mean_interval(list(np.diag(M)), seed=cfg.seed),
                         "seconds": time.perf_counter() - t_lvl}
                # The same split inside the pretrained digits and inside the new ones: the new
                # classes' untrained logits make their block dominate the whole matrix.
                known = np.isin(y, cfg.pretrain_classes)
                for part, keep in (("known_classes", known), ("new_classes", ~known)):
                    if keep.sum() >= 3:
                        sub = M[np.ix_(keep, keep)]
                        entry[part] = {"samples": int(keep.sum()), "symmetry": symmetry_interval(sub, seed=cfg.seed),
                                       "class": class_split(sub, y[keep], y[keep], cfg.seed)}
                if level.label:  # rows grouped by the label they were trained with
                    entry["trained_label"] = class_split(M, yr, y, cfg.seed)
                if k and "clean" in mats:
                    entry["clean_row_correlation"] = mean_interval(_row_correlation(M, mats["clean"]), seed=cfg.seed)
                levels[name] = entry
    result = {"spec": cfg.model_dump(), "samples": int(len(x)), "pretrain_test_accuracy": acc,
              "pretrain_seconds": t_pre, "params": int(sum(p.numel() for p in net.parameters())),
              "levels": levels, "seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}
    from factlab.atomic import staged_dir

    # written into a temporary sibling and moved into place when complete: an interrupted run
    # leaves nothing that a rerun would take for a result
    with staged_dir(out_dir) as tmp:
        np.savez_compressed(tmp / "digits-eif.npz", labels=y, dataset_index=split["held_index"],
                            **{f"eif_{n}": M for n, M in mats.items()})
        plot(tmp / "digits-eif.png", mats, y)
        (tmp / "digits.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    if console is not None:
        _print(result, console)
    return result


def _fmt(x: dict | None) -> str:
    if not x or x.get("value") is None:
        return "n/a"
    lo, hi = x.get("ci_low"), x.get("ci_high")
    return f"{x['value']:.3g} [{lo:.3g}, {hi:.3g}]" if lo is not None else f"{x['value']:.3g}"


def _print(result: dict, console: Console) -> None:
    from rich.table import Table

    t = Table(title=f"digits CNN, {result['samples']} held-out samples "
                    f"(pretrain accuracy {result['pretrain_test_accuracy']:.3f}; {result['seconds']:.1f} s)")
    for col in ("rows", "symmetry", "within class", "across class", "within − across", "self", "vs clean row"):
        t.add_column(col)
    for name, e in result["levels"].items():
        t.add_row(name, _fmt(e["symmetry"]), _fmt(e["class"]["within"]), _fmt(e["class"]["across"]),
                  _fmt(e["class"]["difference"]), _fmt(e["self_influence"]), _fmt(e.get("clean_row_correlation")))
    console.print(t)


class DigitsTask(_Strict):
    """The `influence:` block of a digits experiment: the task and its settings, nothing else
    (the LLM study's keys, e.g. `lr`, do not apply here)."""

    task: Literal["digits"]
    digits: DigitsSpec


class DigitsExperiment(_Strict):
    """A whole digits experiment file: everything the task reads, and nothing it would ignore."""

    name: str | None = None
    """Names the output folder <output_dir>/<name>-digits (default: the file's name)."""
    output_dir: str | None = None
    """Parent of the output folder, relative to the file (default: runs/ in the current folder;
    `factlab influence -o DIR` overrides it)."""
    influence: DigitsTask

    @field_validator("name")
    @classmethod
    def _name_rule(cls, v: str | None) -> str | None:
        from factlab.config import check_run_name

        return None if v is None else check_run_name(v)


def _schema_error(e: ValidationError, experiment: Path) -> FactlabError:
    from factlab.config import format_validation_error

    first = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
    loc = [str(x) for x in first["loc"]]
    if first["type"] == "extra_forbidden" and len(loc) <= 2 and loc[:1] != ["digits"]:
        from factlab.config import non_ascii_letter

        odd = non_ascii_letter(loc[-1])
        hint = f"it holds {odd}; retype it" if odd else "remove it, or put the CNN's settings under influence.digits"
        return FactlabError(f"config error in {experiment}: {'.'.join(loc)}: unknown key for the digits task (it reads "
                            f"name, output_dir, influence.task and influence.digits); {hint}")
    return FactlabError(format_validation_error(e, str(experiment)))


def digits_block(experiment: Path) -> DigitsExperiment | None:
    """The experiment file validated as a digits experiment when its `influence:` block asks
    for the digits task (`task: digits`), else None (an LLM influence study, validated as an
    Experiment); FactlabError for a missing or unreadable file, or any key or value the
    digits schema does not accept."""
    import yaml

    from factlab.config import load_yaml
    from factlab.data.io import read_text

    try:  # read like every experiment file: BOM, NUL bytes and duplicate keys get one clear line
        doc = load_yaml(read_text(experiment, "experiment file")) or {}
    except yaml.YAMLError as e:
        raise FactlabError(f"{experiment} is not valid YAML: {str(e).splitlines()[0]}") from None
    infl = doc.get("influence") if isinstance(doc, dict) else None
    if not isinstance(infl, dict) or "task" not in infl:
        return None
    if infl["task"] != "digits":
        raise FactlabError(f"{experiment}: influence.task {infl['task']!r} is not a task; write `task: digits` for the "
                           "small-CNN experiment, or leave task out for an LLM influence study")
    if "digits" not in infl:
        raise FactlabError(f"{experiment}: influence.task is digits but there is no influence.digits block; "
                           "add `digits: {}` for the defaults")
    if infl["digits"] is None:
        infl["digits"] = {}
    try:
        return DigitsExperiment.model_validate(doc)
    except ValidationError as e:
        raise _schema_error(e, experiment) from None


def run_digits_file(experiment: Path, out: Path | None, console, parent: Path | None = None) -> Path:
    """Run the digits block of an experiment file into `out`, or into <parent>/<name>-digits
    (parent: `factlab influence -o PARENT`, else the file's output_dir, else runs/)."""
    exp = digits_block(experiment)
    if exp is None:
        raise FactlabError(f"{experiment} has no influence block with task: digits; add "
                           "`influence: {task: digits, digits: {}}`")
    if parent is None and exp.output_dir is not None:
        parent = Path(experiment).parent / Path(exp.output_dir).expanduser()  # relative to the file, like every path in it
    out = out or Path(parent or "runs") / f"{exp.name or Path(experiment).stem}-digits"
    if out.exists() and not out.is_dir():
        raise FactlabError(f"{out} is a file; the digits result is a folder: move the file or give another output folder")
    if (out / "digits.json").exists():
        raise FactlabError(f"{out} already holds a digits result; pass another output folder or remove it")
    run_digits(exp.influence.digits, out, console)
    console.print(f"wrote {out}/digits.json, digits-eif.npz, digits-eif.png")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m factlab.influence.digits EXPERIMENT.yaml [--out DIR]`` (the same as
    ``factlab influence EXPERIMENT.yaml -o DIR`` for a digits experiment)."""
    import argparse

    from rich.console import Console

    ap = argparse.ArgumentParser(prog="python -m factlab.influence.digits", description=main.__doc__)
    ap.add_argument("experiment", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="output folder (must not hold a previous result)")
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    try:
        run_digits_file(args.experiment, args.out, console)
        return 0
    except FactlabError as e:
        console.print(f"error: {e}", markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
