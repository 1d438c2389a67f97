"""The `factlab tune` part of a report: which probe files chose and which reported, the
Pareto front (plot and table), every trial, and which settings mattered (Optuna's parameter
importances). Sections use build.py's tuple format: ("table", title, note, header, rows) and
("figure", title, matplotlib figure)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from factlab.experiment.store import RunStore  # noqa: E402


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{v:.3f}"
    return str(v)


def _param(v) -> str:
    if isinstance(v, str) and v[:1] in "[{":
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            pass
    if isinstance(v, list):
        return ",".join(map(str, v))
    return _fmt(v)


def plot_front(study):
    """Scatter of the first two objectives over complete trials, the Pareto front marked (one
    objective: its value per trial)."""
    from optuna.trial import TrialState

    objectives = study.user_attrs.get("objectives", [])
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done or not objectives:
        return None
    front = {t.number for t in study.best_trials}
    fig, ax = plt.subplots(figsize=(8, 4.8))
    if len(objectives) >= 2:
        xs, ys = [t.values[0] for t in done], [t.values[1] for t in done]
        ax.set_xlabel(f"{objectives[0]['metric']} ({objectives[0]['direction']})")
        ax.set_ylabel(f"{objectives[1]['metric']} ({objectives[1]['direction']})")
    else:
        xs, ys = [t.number for t in done], [t.values[0] for t in done]
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{objectives[0]['metric']} ({objectives[0]['direction']})")
    on = [i for i, t in enumerate(done) if t.number in front]
    ax.scatter(xs, ys, s=36, color="tab:gray", label="trial", zorder=2)
    ax.scatter([xs[i] for i in on], [ys[i] for i in on], s=60, color="tab:red", label="Pareto front", zorder=3)
    if len(objectives) >= 2 and on:
        pts = sorted((xs[i], ys[i]) for i in on)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="tab:red", zorder=1)
    for x, y, t in zip(xs, ys, done):
        ax.annotate(str(t.number), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def importance_rows(study) -> tuple[list[str], list[list[str]], str]:
    """Header, rows and a note: per objective, the importance of each setting
    (optuna.importance.get_param_importances; fANOVA would need scikit-learn)."""
    import optuna
    from optuna.trial import TrialState

    objectives = study.user_attrs.get("objectives", [])
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    header = ["setting", *[o["metric"] for o in objectives]]
    if len(done) < 2:
        return header, [], f"needs at least 2 complete trials (has {len(done)})"
    per: list[dict] = []
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PED-ANOVA's notes on few trials; the note below says so
            for i, o in enumerate(objectives):
                # Optuna's default evaluator (PED-ANOVA) explains what gets a *low* target: negate maximised ones.
                sign = -1.0 if o["direction"] == "maximize" else 1.0
                per.append(optuna.importance.get_param_importances(
                    study, target=lambda t, i=i, sign=sign: sign * t.values[i]))
    except (RuntimeError, ValueError) as e:  # e.g. every trial had the same settings
        return header, [], f"not computable yet ({e})"
    keys = sorted({k for d in per for k in d}, key=lambda k: -max(d.get(k, 0.0) for d in per))
    return header, [[k, *[f"{d.get(k, 0.0):.2f}" for d in per]] for k in keys], (
        "How much each setting decides whether a trial is among the best for each objective "
        "(optuna.importance.get_param_importances, its default PED-ANOVA evaluator; normalised to sum to 1); "
        "few trials make these rough.")


def tune_sections(name: str, store: RunStore, storage: str | None = None) -> list[tuple]:
    """The report sections of study `name` (in `storage`, an RDB URL, or beside `store`), or []
    when there is none. Everything comes from the study's storage (trials' values and user
    attrs), so a study whose trials ran on other machines reports whole."""
    from optuna.trial import TrialState

    from factlab.experiment.tune import front_trials, load_study

    study = load_study(store, name, storage)
    if study is None:
        return []
    attrs = study.user_attrs
    objectives = attrs.get("objectives", [])
    files = [["chose the recipe (tune.select_probes)", ", ".join(Path(p).name for p in attrs.get("select_probes", [])),
              ", ".join(attrs.get("select_probes", []))],
             ["reported it (eval.probes)", ", ".join(Path(p).name for p in attrs.get("eval_probes", [])),
              ", ".join(attrs.get("eval_probes", []))]]
    states = {s: len(study.get_trials(deepcopy=False, states=(s,))) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    sections: list[tuple] = [
        ("table", f"Tuning study {name}: which probes chose and which reported",
         f"{states[TrialState.COMPLETE]} complete, {states[TrialState.PRUNED]} pruned, {states[TrialState.FAIL]} failed trials. "
         "Objectives were computed on the selection probes only; the same metrics on the report probes (never used to "
         "choose) are shown beside them. damage = perplexity after / before - 1 on general text; "
         "priming = share of answers to locality probes and general prompts with a trained name the base model did not say there.",
         ["role", "files", "paths"], files),
        ("figure", f"Pareto front of {name} (red: not dominated)", plot_front(study)),
    ]
    ohead = []
    for o in objectives:
        ohead += [f"{o['metric']} {'↑' if o['direction'] == 'maximize' else '↓'} (select)", f"{o['metric']} (report)"]
    keys = list(attrs.get("space", {}))

    def row(t) -> list[str]:
        rep = t.user_attrs.get("report", {})
        vals = []
        for i, o in enumerate(objectives):
            vals += [_fmt(t.values[i]) if t.values else "-", _fmt(rep.get(o["metric"]))]
        return [str(t.number), *[_param(t.params.get(k)) for k in keys], *vals]

    short = [".".join(k.split(".")[-2:]) for k in keys]  # stages.0.train.lr -> train.lr
    front = front_trials(study)
    sections.append(("table", f"Pareto front of {name}", "Trials no other trial beats on every objective "
                     "(study.best_trials), chosen on the selection probes.", ["trial", *short, *ohead], [row(t) for t in front]))
    def state(t) -> str:
        steps = sorted(k for k in t.user_attrs if k.startswith("intermediate."))
        if t.state == TrialState.PRUNED and steps:
            return f"pruned at stage {int(steps[-1].split('.')[1]) + 1} ({_fmt(t.user_attrs[steps[-1]])})"
        # a retry: queued again by factlab (user attr) or by Optuna's stale-trial callback (system attr)
        retry = t.user_attrs.get("retry_of", t.system_attrs.get("failed_trial"))
        return t.state.name.lower() + (f" (retry of {retry})" if retry is not None else "")

    everything = study.get_trials(deepcopy=False)
    hosts = {t.user_attrs.get("host") for t in everything} - {None}
    trials = [[*row(t)[:1], state(t), *row(t)[1:], Path(t.user_attrs.get("run_dir", "")).name,
               *([t.user_attrs.get("host", "-")] if len(hosts) > 1 else [])] for t in everything]
    sections.append(("table", "All trials", "Every trial of the study with its settings, state and run folder "
                     "(pruned: stopped after an early stage; failed: interrupted or errored, retried)"
                     + (f"; the trials ran on {len(hosts)} hosts, each run folder is under its host's output folder."
                        if len(hosts) > 1 else "."),
                     ["trial", "state", *short, *ohead, "run", *(["host"] if len(hosts) > 1 else [])], trials))
    header, rows, note = importance_rows(study)
    sections.append(("table", "Which settings mattered", note, header, rows or [["-", *["-"] * len(objectives)]]))
    return [s for s in sections if s[0] == "table" or s[2] is not None]
