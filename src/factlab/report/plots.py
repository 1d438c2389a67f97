"""Plots (matplotlib, Agg): the report's figures and each stage's loss.png, drawn from saved
run folders alone."""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from factlab.experiment.run_folder import RunFolder, StageRecord  # noqa: E402
from factlab.report.tables import Run, fact_recall, kinds_of, ppl_ratio  # noqa: E402


def plot_stage_loss(folder: RunFolder, stage: StageRecord) -> Path | None:
    """Draw a stage's training (and held-out) loss against optimizer step into its folder's
    loss.png (from its train.json); returns the path, or None when nothing was logged.

    Written atomically under a new inode: a stage folder a sweep reused is hard-linked to the
    one that trained it, and must not change under it."""
    history = folder.loss_history(stage)
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    heldout = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not heldout:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if heldout:
        ax.plot(*zip(*heldout), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    tps = stage.get("tokens_per_second") or 0
    ax.set_title(f"{stage.name} ({stage.get('kind', '?')}): {stage.get('steps', '?')} steps, {tps:,.0f} tok/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = folder.loss_plot_path(stage)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when x (forgetting) is minimised and y (recall)
    maximised, sorted by x."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_tradeoff(runs: list[Run]):
    """Recall (pooled accuracy on fact probes) against held-out perplexity ratio, last stage."""
    pts, labels = [], []
    for r in runs:
        st = r.last_stage()
        rec = fact_recall(r.summary(st))
        pr = ppl_ratio(r, st)
        if rec and rec["rate"] is not None and pr is not None:
            pts.append((pr, rec["rate"]))
            labels.append(r.label)
    if not pts:
        return None
    # Variants often land on top of each other (same recall, close perplexity): each point is
    # numbered on the plot and named in the legend beside it, rather than labelled in place.
    fig, ax = plt.subplots(figsize=(11, 4.8))
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:red", label="Pareto front", zorder=2)
    cmap = plt.get_cmap("tab10" if len(pts) <= 10 else "tab20")
    for i, ((x, y), lab) in enumerate(zip(pts, labels)):
        ax.scatter([x], [y], s=46, color=cmap(i % cmap.N), zorder=3, label=f"{i + 1}: {lab}" + (" (front)" if i in front else ""))
        ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(4, 4 + 7 * (i % 3)), fontsize=8)
    ax.set_xlabel("held-out perplexity after / before (lower: less forgetting)")
    ax.set_ylabel("fact recall (candidate accuracy)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def plot_losses(runs: list[Run]):
    stage_names = []
    for r in runs:
        for s in r.loss:
            if s not in stage_names:
                stage_names.append(s)
    if not stage_names:
        return None
    fig, axes = plt.subplots(1, len(stage_names), figsize=(5 * len(stage_names), 3.6), squeeze=False)
    for ax, st in zip(axes[0], stage_names):
        held_out = False
        for i, r in enumerate(runs):
            color = f"C{i % 10}"
            hist = [(h["step"], h["loss"]) for h in r.loss.get(st, []) if "loss" in h]
            if hist:
                ax.plot(*zip(*hist), label=r.label, lw=1.2, color=color)
            heldout = [(h["step"], h["eval_loss"]) for h in r.loss.get(st, []) if "eval_loss" in h]
            if heldout:  # stages with train.eval_fraction: the held-out loss, dashed, same colour
                ax.plot(*zip(*heldout), ls="--", marker=".", lw=1.2, color=color)
                held_out = True
        ax.set_title(f"{st}: training loss" + (" (dashed: held-out)" if held_out else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_stage_bars(runs: list[Run]):
    """Per variant: accuracy of each probe kind at base and after each stage."""
    kinds = kinds_of(runs)
    if not kinds:
        return None
    n = len(runs)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, r in zip(axes.flat, runs):
        labels = list(r.results.evaluations)
        width = 0.8 / max(1, len(labels))
        for i, st in enumerate(labels):
            vals = [((r.summary(st).get(k) or {}).get("accuracy") or {}).get("rate") or 0.0 for k in kinds]
            ax.bar([j + i * width for j in range(len(kinds))], vals, width, label=st)
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(kinds))])
        ax.set_xticklabels(kinds, fontsize=7, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title(r.label, fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
