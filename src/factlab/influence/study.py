"""`factlab influence EXPERIMENT.yaml`: the sample set → the exact and in-context matrices →
the desiderata → a run folder.

Everything that can be wrong with the input (the sample set, the rows, the probe files, a
sample with nothing to score, the model, a chat template) is checked before the matrices are
computed, and the run folder is written only at the end, through
``experiment.run_folder.RunFolder.staged`` (under ``<name>.partial``, renamed when complete): a
failed or interrupted run leaves nothing behind. RunFolder owns the folder's layout
(``runs/<name>-influence-<timestamp>/``: config.yaml, samples.jsonl, eif.npz, eif.csv/.jsonl,
eif_ctx.csv/.jsonl, heatmap.png, heatmap_ctx.png and the results) and its records
(InfluenceResults, InfluenceMatrices); this module computes them and draws the heatmaps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from factlab.errors import FactlabError
from factlab.experiment.run_folder import (
    INFLUENCE, InfluenceDesiderata, InfluenceMatrices, InfluenceResults, InfluenceSchedule, InfluenceTiming, RunFolder,
)
from factlab.influence import desiderata as D
from factlab.influence.samples import Sample

if TYPE_CHECKING:
    from rich.console import Console

    from factlab.config import Experiment
    from factlab.experiment.store import RunStore
    from factlab.influence.sources import SampleSet


# ---------------------------------------------------------------------------------------
# The desiderata of one matrix


def _rows_of(rows: list[Sample], n_clean: int) -> dict[str, list[int]]:
    """group (fact id) → indices of the clean rows of that group."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(rows[:n_clean]):
        if r.group is not None:
            out.setdefault(r.group, []).append(i)
    return out


def sparsity_k(top_k: int, n: int) -> int:
    """The k used for the sparsity of an n x n matrix: top_k, at most half of the n − 1
    off-diagonal entries of a row (at least 1)."""
    return max(1, min(top_k, (n - 1) // 2))


def desiderata(M: np.ndarray, rows: list[Sample], cols: list[Sample], n_clean: int, kind: str,
               top_k: int = 5, n_boot: int = 1000, seed: int = 0) -> dict:
    """The paper's desiderata for one matrix M (R, C) whose first ``n_clean`` rows are the clean
    training samples (the rest noised copies). Each entry is an interval dict {n, value, ci_low,
    ci_high} (95% percentile bootstrap), or None when the sample set has no such structure.

    symmetry: corr(EIF, EIFᵀ) over the samples that are both rows and columns (bootstrap over
    samples). sparsity: mean share of a row's |influence| in its k largest entries on that
    square part (diagonal left out; k = ``sparsity_k(top_k, n)``). distance_*: per clean
    row, the mean EIF on other samples of the same group (same fact), of the same relation
    but another fact, and of another relation; then the mean over rows. noise_<level>: Pearson correlation of each noised row with its
    clean row, mean over samples. transitive (chains): per pair u<v two or more links apart,
    Σ over the links on the path of [EIF(link, "u causes v") − EIF(link, "v causes u")]; < 0:
    the links lowered the forward statement more. containment_A / containment_B: per fact
    "A is in B", EIF("B contains A") − EIF("B is in A") and EIF("A is in B") − EIF("A contains
    B"); < 0: the logically valid statement gained more. *_negative: the share of those < 0.
    """
    M = np.asarray(M, dtype=np.float64)
    out: dict[str, dict | None] = {}
    col_index = {c.id: j for j, c in enumerate(cols)}
    sq = [(i, col_index[r.id]) for i, r in enumerate(rows[:n_clean]) if r.id in col_index]
    if len(sq) >= 3:
        ri, ci = zip(*sq)
        S = M[np.ix_(ri, ci)]
        out["symmetry"] = D.symmetry_interval(S, n_boot, seed)
        # k below half a row's off-diagonal entries: at k = n − 1 every row's share is 1.
        out["sparsity"] = D.sparsity_interval(S, sparsity_k(top_k, len(sq)), True, n_boot, seed)
    else:
        out["symmetry"] = out["sparsity"] = None

    # distance: same fact, same relation (another fact), another relation
    per: dict[str, list[float]] = {"same_fact": [], "same_relation": [], "other_relation": []}
    for i, r in enumerate(rows[:n_clean]):
        if r.group is None:
            continue
        acc: dict[str, list[float]] = {k: [] for k in per}
        for j, c in enumerate(cols):
            if c.id == r.id or c.group is None or c.meta.get("structure"):
                continue
            rel_r, rel_c = r.meta.get("relation"), c.meta.get("relation")
            if c.group == r.group:
                acc["same_fact"].append(M[i, j])
            elif rel_r is not None and rel_r == rel_c:
                acc["same_relation"].append(M[i, j])
            else:
                acc["other_relation"].append(M[i, j])
        for k, v in acc.items():
            if v:
                per[k].append(float(np.mean(v)))
    for k, v in per.items():
        out[f"distance_{k}"] = D.mean_interval(v, n_boot, seed) if v else None

    # noise invariance, per level
    by_level: dict[float, list[float]] = {}
    clean_index = {r.id: i for i, r in enumerate(rows[:n_clean])}
    for i in range(n_clean, len(rows)):
        r = rows[i]
        c = clean_index.get(r.meta.get("clean_id"))
        if c is None:
            continue
        a, b = M[i], M[c]
        corr = float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else None
        by_level.setdefault(float(r.meta["noise"]), []).append(corr)
    for level, vals in sorted(by_level.items()):
        out[f"noise_{level:g}"] = D.mean_interval(vals, n_boot, seed)

    groups = _rows_of(rows, n_clean)
    if kind == "chain":
        diffs = []
        for c in cols:
            if c.meta.get("direction") != "forward":
                continue
            back = col_index.get(f"chain:{c.meta['v']}>{c.meta['u']}")
            if back is None or not all(f in groups for f in c.meta["path"]):
                continue
            j = col_index[c.id]
            diffs.append(sum(float(np.mean(M[groups[f], j] - M[groups[f], back])) for f in c.meta["path"]))
        out["transitive"] = D.mean_interval(diffs, n_boot, seed) if diffs else None
        out["transitive_negative"] = D.mean_interval([float(d < 0) for d in diffs], n_boot, seed) if diffs else None
    if kind == "containment":
        for which, good, bad in (("A", "contains", "is_in-swapped"), ("B", "is_in", "contains-swapped")):
            diffs = []
            for fact, idx in groups.items():
                g, b = col_index.get(f"{fact}:{good}"), col_index.get(f"{fact}:{bad}")
                if g is not None and b is not None:
                    diffs.append(float(np.mean(M[idx, g] - M[idx, b])))
            out[f"containment_{which}"] = D.mean_interval(diffs, n_boot, seed) if diffs else None
            out[f"containment_{which}_negative"] = (D.mean_interval([float(d < 0) for d in diffs], n_boot, seed)
                                                    if diffs else None)
    return out


DESIDERATA_LABELS = {
    "symmetry": "symmetry: corr(EIF, EIFᵀ)",
    "sparsity": "sparsity: top-k share of a row's absolute influence",
    "distance_same_fact": "distance: same fact, other phrasing",
    "distance_same_relation": "distance: same relation, other fact",
    "distance_other_relation": "distance: other relation",
    "transitive": "transitive: Σ links [A→Z − Z→A] (<0 good)",
    "transitive_negative": "transitive: share of pairs with A→Z gaining more",
    "containment_A": "containment: [B contains A − B is in A] (<0 good)",
    "containment_A_negative": "containment: share with 'B contains A' gaining more",
    "containment_B": "containment order B: [A is in B − A contains B] (<0 good)",
    "containment_B_negative": "containment order B: share with 'A is in B' gaining more",
}


def label_of(key: str) -> str:
    """The human label of a desideratum key (noise levels included)."""
    if key.startswith("noise_"):
        return f"noise invariance: corr(noised row, clean row), level {key[6:]}"
    return DESIDERATA_LABELS.get(key, key)


def fmt_interval(x: dict | None) -> str:
    """``0.123 [0.100, 0.150] (n)``, or an empty string."""
    if not x or x.get("value") is None:
        return ""
    ci = f" [{x['ci_low']:.3g}, {x['ci_high']:.3g}]" if x.get("ci_low") is not None else ""
    return f"{x['value']:.3g}{ci} ({x['n']})"


# ---------------------------------------------------------------------------------------
# Heatmaps


def heatmap_figure(M: np.ndarray, row_ids: list[str], col_ids: list[str], title: str):
    """The matrix as a heatmap figure: 0 white, blue negative (the row helped the column), red
    positive; tick labels while there are at most 80 of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R, C = M.shape
    fig, ax = plt.subplots(figsize=(min(4 + 0.18 * C, 30), min(3 + 0.18 * R, 30)))
    lim = float(np.nanmax(np.abs(M))) or 1.0
    im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    if C <= 80:
        ax.set_xticks(range(C), col_ids, rotation=90, fontsize=6)
    if R <= 80:
        ax.set_yticks(range(R), row_ids, fontsize=6)
    ax.set_xlabel("scored sample j")
    ax.set_ylabel("trained on / in context: sample i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="EIF[i, j] = ΔL_j (nats/token)")
    fig.tight_layout()
    return fig


def heatmap(path: Path, M: np.ndarray, row_ids: list[str], col_ids: list[str], title: str) -> None:
    """heatmap_figure saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = heatmap_figure(M, row_ids, col_ids, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# The command


def prepare(exp: Experiment) -> tuple[SampleSet, list[Sample], list[Sample], int]:
    """Everything before a model: (sample set, rows (clean then noised), columns, n_clean).
    Raises FactlabError on bad input."""
    from factlab.influence.noise import noised_copies
    from factlab.influence.sources import load_sample_set, probe_columns, select_rows

    spec = exp.influence
    if spec is None:
        raise FactlabError("the experiment has no influence: section; add one (see examples/influence-chains.yaml)")
    sset = load_sample_set(spec.samples)
    rows = select_rows(sset.samples, spec.train)
    if len(rows) < 2:
        raise FactlabError(f"influence.train selects {len(rows)} sample(s); an influence matrix needs at least 2 rows")
    cols = (list(sset.samples) if spec.score_samples else []) + list(sset.structure) + probe_columns(spec.probes)
    seen: set[str] = set()
    for c in cols:
        if c.id in seen:
            raise FactlabError(f"column id {c.id!r} appears twice (a probe id equal to a sample id?); "
                               "give the probes unique ids")
        seen.add(c.id)
    for c in cols:
        if not c.target.strip():
            raise FactlabError(f"column {c.id!r} has nothing to score (empty target); remove it or give a target")
    noisy = noised_copies(rows, spec.noise.levels, spec.noise.kind, exp.seed) if spec.noise else []
    return sset, rows + noisy, cols, len(rows)


def _sample_rows(rows: list[Sample], cols: list[Sample]) -> list[dict]:
    """samples.jsonl's rows: each sample once (rows first), with its role."""
    col_ids, row_ids = {c.id for c in cols}, {r.id for r in rows}
    out: list[dict] = []
    seen: set[str] = set()
    for s in rows + cols:
        if s.id in seen:
            continue
        seen.add(s.id)
        role = "both" if s.id in col_ids and s.id in row_ids else ("row" if s.id in row_ids else "column")
        out.append({"id": s.id, "role": role, "prompt": s.prompt, "target": s.target, "group": s.group, "meta": s.meta})
    return out


InfluenceCallback = Callable[[RunFolder, InfluenceResults], None]


def run_influence(exp: Experiment, console: Console | None = None, store: RunStore | None = None,
                  on_done: InfluenceCallback | None = None) -> Path:
    """Run the influence study of ``exp.influence`` and write its run folder; returns its path.

    `console` shows progress (the rows' bar, one status line before and one after). The
    results are presented by the caller: `on_done(folder, results)` is called once the folder
    is complete (the CLI prints the desiderata table there). With a `store`, the finished run
    is indexed there (kind `influence`, its desiderata and timing as metrics), after the
    folder is in place: a failed run leaves no trace in either."""
    import torch
    from rich.console import Console as RichConsole

    from factlab.config import dump_experiment
    from factlab.influence.exact import Schedule, exact_eif, sample_tokens
    from factlab.influence.in_context import in_context_eif
    from factlab.models.device import resolve_device
    from factlab.models.loading import load_model, resolve_model

    console = console or RichConsole(stderr=True)
    started = time.time()
    spec = exp.influence
    sset, rows, cols, n_clean = prepare(exp)
    schedule = Schedule(steps=spec.steps, lr=spec.lr, optimizer=spec.optimizer, weight_decay=spec.weight_decay,
                        max_grad_norm=spec.max_grad_norm, batch_size=spec.batch_size)
    seeds = spec.seeds or [exp.seed]
    model, tok = load_model(resolve_model(exp.model, console), device=resolve_device(exp.device))
    if any(s.chat for s in rows + cols):
        from factlab.data.sft import require_chat_template

        require_chat_template(tok, "chat samples (Q&A, qa probes)")
    from factlab.evaluate.scoring import split_pair
    from factlab.influence.samples import scored_pair

    for s in rows:
        sample_tokens(tok, s)  # FactlabError for a target that encodes to nothing
    for c in cols:
        split_pair(tok, *scored_pair(c, tok))
    console.print(f"influence {exp.name}: {len(rows)} rows ({n_clean} samples"
                  + (f" + {len(rows) - n_clean} noised" if len(rows) > n_clean else "")
                  + f") x {len(cols)} columns, {len(seeds)} seed(s)")

    cpu0 = time.process_time()
    res = exact_eif(model, tok, rows, cols, spec.peft, schedule, seeds, console=console)
    cpu_exact = time.process_time() - cpu0
    ctx = None
    cpu_ctx = 0.0
    if spec.in_context:
        cpu0 = time.process_time()
        ctx = in_context_eif(model, tok, rows, cols, spec.batch_size, base_loss=res.base_loss[0], console=console)
        cpu_ctx = time.process_time() - cpu0

    M = res.mean()
    des = InfluenceDesiderata(finetune=desiderata(M, rows, cols, n_clean, sset.kind, spec.top_k, spec.bootstrap, exp.seed))
    if len(seeds) > 1:  # the same numbers per seed: how much the adapter's initialisation moves them
        per_seed = [desiderata(res.eif[s], rows, cols, n_clean, sset.kind, spec.top_k, 200, exp.seed)
                    for s in range(len(seeds))]
        des.finetune_per_seed = {k: [p[k]["value"] if p[k] else None for p in per_seed] for k in des.finetune}
        # the interval over seeds: mean of the per-seed values, bootstrap over seeds
        des.finetune_over_seeds = {k: D.mean_interval([v for v in vals if v is not None], spec.bootstrap, exp.seed)
                                   for k, vals in des.finetune_per_seed.items()}
    if ctx is not None:
        des.in_context = desiderata(ctx.eif, rows, cols, n_clean, sset.kind, spec.top_k, spec.bootstrap, exp.seed)
    results = InfluenceResults(
        name=exp.name, model=exp.model, sample_set=sset.kind,
        n_rows=len(rows), n_clean_rows=n_clean, n_columns=len(cols), seeds=seeds,
        schedule=InfluenceSchedule(steps=spec.steps, lr=spec.lr, optimizer=spec.optimizer,
                                   weight_decay=spec.weight_decay, max_grad_norm=spec.max_grad_norm),
        peft=spec.peft.model_dump(mode="json"),
        trainable_params=res.trainable_params,
        sparsity_k=sparsity_k(spec.top_k, sum(1 for r in rows[:n_clean] if r.id in {c.id for c in cols})),
        timing=InfluenceTiming(
            finetune_seconds=round(res.seconds, 2),
            finetune_seconds_per_row=round(float(res.row_seconds.mean()), 3),
            finetune_cpu_seconds=round(cpu_exact, 2),
            in_context_seconds=round(ctx.seconds, 2) if ctx else None,
            in_context_seconds_per_row=round(float(ctx.row_seconds.mean()), 3) if ctx else None,
            in_context_cpu_seconds=round(cpu_ctx, 2) if ctx else None,
            threads=torch.get_num_threads(),
        ),
        desiderata=des,
    )
    matrices = InfluenceMatrices(eif_mean=M, row_ids=res.row_ids, col_ids=res.col_ids, eif=res.eif,
                                 base_loss=res.base_loss, train_loss=res.train_loss, row_seconds=res.row_seconds,
                                 seeds=seeds, eif_ctx=ctx.eif if ctx is not None else None)

    # --- write: the whole folder, staged and renamed when complete (the results last) -------
    with RunFolder.staged(Path(exp.output_dir), f"{exp.name}-influence") as folder:
        folder.write_config(dump_experiment(exp))
        folder.write_samples(_sample_rows(rows, cols))
        folder.write_matrices(matrices)
        heatmap(folder.heatmap_path(), M, res.row_ids, res.col_ids,
                f"{exp.name}: fine-tuning EIF ({spec.peft.method}, {spec.steps} step(s), lr {spec.lr:g})")
        if ctx is not None:
            heatmap(folder.heatmap_path(in_context=True), ctx.eif, ctx.row_ids, ctx.col_ids, f"{exp.name}: in-context EIF")
        folder.write_influence(results)
    if store is not None:
        store.start(folder.path, exp.name, exp.model_dump(mode="json"), kind=INFLUENCE, started=started)
        store.finish(folder.path, results)
    if on_done is not None:
        on_done(folder, results)
    console.print(f"run folder: {folder.path}")
    return folder.path
