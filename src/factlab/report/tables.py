"""Run data as tables: load saved runs (through RunFolder) and lay them side by side."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from factlab.evaluate.metrics import wilson_interval
from factlab.evaluate.priming import leaked_text
from factlab.evaluate.textmetrics import bootstrap_mean_interval
from factlab.experiment.run_folder import BASE, RunFolder, RunResults
from factlab.report.console import STYLE_COLUMNS, priming_cell
from factlab.report.format import interval, number, order_kinds


@dataclass
class Run:
    """Everything a report needs from one run folder."""

    run: RunFolder
    label: str
    config: dict
    results: RunResults
    loss: dict[str, list[dict]] = field(default_factory=dict)
    """stage name -> loss history (train.json)."""

    @property
    def folder(self) -> Path:
        return self.run.path

    @property
    def stages(self) -> list[str]:
        """The stages that were evaluated, in order (not the untrained model's evaluations)."""
        return self.results.trained_labels

    def last_stage(self) -> str:
        return (self.stages or [BASE])[-1]

    def summary(self, label: str) -> dict:
        """Probe kind -> metric summaries of one evaluation ({} when there is none)."""
        ev = self.results.evaluations.get(label)
        return ev.summaries if ev is not None else {}

    def rows(self, label: str) -> list[dict]:
        """The per-probe rows of one evaluation."""
        return self.run.read_scores(label)


def load_run(folder: str | Path, label: str | None = None) -> Run:
    """A run folder's results, config and loss histories (FactlabError when it is not a run)."""
    run = RunFolder(folder)
    results = run.read_results()
    loss = {st.name: run.loss_history(st) for st in results.stages}
    return Run(run, label or run.path.name, run.read_config(), results, {k: v for k, v in loss.items() if v})


def fact_recall(summary: dict) -> dict | None:
    """Pooled candidate accuracy over the fact kinds (every kind but locality): k, n, rate."""
    k = n = 0
    for kind, s in summary.items():
        if kind in ("all", "locality"):
            continue
        acc = s.get("accuracy") or {}
        k += acc.get("k") or 0
        n += acc.get("n") or 0
    return {"k": k, "n": n, "rate": k / n if n else None}


def ppl_ratio(run: Run, stage: str) -> float | None:
    """Held-out perplexity after / before, the mean over the general texts (1 + damage)."""
    f = run.results.forgetting.get(stage) or {}
    ratios = [p["perplexity_ratio"] for p in (f.get("perplexity") or {}).values()]
    return sum(ratios) / len(ratios) if ratios else None


def locality_delta(run: Run, stage: str, view: str = "locality") -> float | None:
    """Change of locality against the base model: `locality` (candidate accuracy) or
    `locality_greedy` (greedy answers still contain the known fact)."""
    return ((run.results.forgetting.get(stage) or {}).get(view) or {}).get("delta")


def damage(run: Run, stage: str) -> float | None:
    """The stage's damage figure (relative perplexity increase, mean over general texts); for
    runs saved before it was recorded, the same number from the perplexity ratios."""
    f = run.results.forgetting.get(stage) or {}
    if f.get("damage") is not None:
        return f["damage"]
    ratio = ppl_ratio(run, stage)
    return None if ratio is None else ratio - 1


def priming(run: Run, stage: str) -> dict | None:
    """The stage's priming figure (evaluate.priming.priming_summary), None when not measured."""
    return (run.results.forgetting.get(stage) or {}).get("priming")


def kinds_of(runs: list[Run]) -> list[str]:
    """The probe kinds any run scored (not "all"), in the one kind order."""
    return order_kinds({k for r in runs for s in r.results.summaries.values() for k in s} - {"all"})


def variant_rows(runs: list[Run], stage: str | None = None, all_stages: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per run (its last stage unless `stage`; with `all_stages`, one
    row per trained stage, after a row for the first run's base model), accuracy per probe
    kind with its interval, then forgetting and chat format."""
    kinds = kinds_of(runs)
    header = ["variant", "stage"] + [f"{k} (n)" for k in kinds] + ["damage", "priming", "locality Δ", "locality greedy Δ", "qa EOS"]
    rows = []

    def row(r: Run, st: str, label: str) -> list[str]:
        summ = r.summary(st)
        cells = [label, st]
        for k in kinds:
            acc = (summ.get(k) or {}).get("accuracy")
            cells.append(f"{interval(acc)} ({acc['n']})" if acc and acc.get("n") else "-")
        pr = (priming(r, st) or {}).get("after")
        if pr is None and st == BASE and r.stages:  # the base model's own share of answers with a trained name
            pr = (priming(r, r.stages[0]) or {}).get("before")
        cells += [number(damage(r, st), "{:+.1%}"), priming_cell(pr), number(locality_delta(r, st), "{:+.2f}"),
                  number(locality_delta(r, st, "locality_greedy"), "{:+.2f}"), interval((summ.get("qa") or {}).get("eos"))]
        return cells

    if all_stages and runs and BASE in runs[0].results.evaluations:
        rows.append(row(runs[0], BASE, "(untrained)"))
    for r in runs:
        for st in (r.stages if all_stages else [stage or r.last_stage()]):
            rows.append(row(r, st, r.label))
    return header, rows


def sample_hit_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows like variant_rows, but the share of all sampled answers that contain the
    target, per probe kind (all samples of a kind pooled: k/n with a Wilson interval; the
    samples of one probe are not independent, so read the interval as a lower bound of the
    uncertainty). Empty when no run drew samples."""
    kinds = [k for k in kinds_of(runs)
             if any((r.summary(st).get(k) or {}).get("sample_hits") for r in runs for st in r.results.summaries)]
    if not kinds:
        return [], []
    rows = []

    def row(r: Run, st: str, label: str) -> list[str]:
        cells = [label, st]
        for k in kinds:
            x = (r.summary(st).get(k) or {}).get("sample_hits")
            cells.append(f"{interval(x)} ({x['k']}/{x['n']})" if x and x.get("n") else "-")
        return cells

    if runs and BASE in runs[0].results.evaluations:
        rows.append(row(runs[0], BASE, "(untrained)"))
    for r in runs:
        for st in r.stages:
            rows.append(row(r, st, r.label))
    return ["variant", "stage"] + [f"{k} (samples)" for k in kinds], rows


def priming_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per run and stage, the share of answers that contain a trained name
    the base model did not say there [95% Wilson interval] (k/n), for the locality probes and
    the general prompts, the leaked names with their counts and the first leaking answer.
    Empty when no run measured priming."""
    header = ["variant", "stage", "priming (k/n)", "locality probes", "general prompts", "leaked names", "example"]
    rows = []
    for r in runs:
        for st in r.stages:
            pr = priming(r, st)
            if not pr:
                continue
            ex = (pr.get("examples") or [None])[0]
            rows.append([r.label, st, f"{interval(pr['after'])} ({pr['after']['k']}/{pr['after']['n']})",
                         priming_cell(pr.get("locality")), priming_cell(pr.get("general")),
                         leaked_text(pr.get("leaked"), top=10) or "-",
                         # one line, no table bars: the answer goes into a Markdown table cell too
                         f"{ex['prompt']} → {' '.join(ex['answer'].split())}".replace("|", "/") if ex else "-"])
    return header, rows


def _size(n: float | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def training_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: what each stage cost and how its loss moved, one row per run and stage.
    "train loss first → last" are single logged batches (with dropout / NEFTune noise);
    "train loss after" and "held-out loss" are means over all training / held-out examples
    after training, in eval mode (only when the stage kept examples out: train.eval_fraction).
    `merged` says whether the stage's result was merged into the weights; prompt methods
    (prompt/prefix/P-tuning) cannot be, so they were evaluated as base + adapter."""
    header = ["variant", "stage", "method", "steps", "train loss first → last", "train loss after", "held-out loss", "tok/s",
              "trainable (share)", "saved artefact", "peak RSS MB", "merged"]
    rows = []
    for r in runs:
        for st in r.results.stages:
            first, last = st.get("first_loss"), st.get("final_loss")
            loss = f"{first:.3f} → {last:.3f}" if first is not None and last is not None else "-"
            held, after = st.get("eval_loss"), st.get("train_loss_after")
            params = st.get("trainable_params")
            share = st.get("trainable_share")
            trainable = f"{params:,} ({share:.3%})" if params is not None and share else (f"{params:,}" if params else "-")
            rss = st.get("train_peak_rss_mb") or st.get("peak_rss_mb")
            merged = "yes" if st.get("merged") else "no: evaluated as base + adapter" if st.get("artifact", "adapter") == "adapter" else "no"
            rows.append([r.label, st.name, st.get("method", "lora"), str(st.get("steps", "-")), loss,
                         "-" if after is None else f"{after:.3f}", "-" if held is None else f"{held:.3f}", f"{st.get('tokens_per_second'):.0f}" if st.get("tokens_per_second") else "-",
                         trainable, f"{_size(st.get('artifact_bytes'))} {st.get('artifact', '')}".strip(),
                         f"{rss:.0f}" if rss else "-", merged])
    return header, rows


def style_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for the answers to the SFT training prompts (runs with an SFT stage):
    one row for the first run's base model, then one per run and stage. Empty rows when no
    run measured style."""
    header = ["variant", "model"] + [label for _, label in STYLE_COLUMNS]
    rows = []
    for i, r in enumerate(runs):
        for label, st in r.results.style.items():
            untrained = r.results.is_untrained(label)
            if untrained and i > 0:
                continue  # the untrained model's answers are the same for every variant
            rows.append([r.label if not untrained else "(untrained)", f"{label} (n={st.get('n', 0)})"]
                        + [interval(st.get(k)) for k, _ in STYLE_COLUMNS])
    return header, rows


def rich_table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h in ("variant", "stage", "vs") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def compare_table(runs: list[Run], stage: str | None = None) -> Table:
    return rich_table("runs side by side (candidate accuracy [95% CI] (n); forgetting vs base)", *variant_rows(runs, stage))


def difference_table(runs: list[Run], stage: str | None = None) -> Table | None:
    """The paired differences against the first run, or None for a single run."""
    header, rows = difference_rows(runs, stage)
    if not rows:
        return None
    return rich_table(f"each run minus {runs[0].label} on the same probes: mean per-probe change "
                      "[95% paired bootstrap] (* the interval excludes 0)", header, rows)


def paired_difference(rows_a: list[dict], rows_b: list[dict], kind: str) -> dict:
    """B minus A on the probes of `kind` that both runs scored (matched by probe id): candidate
    accuracy and target log-prob per token, each the mean per-probe difference with a
    bootstrap interval over probes.

    Pairing is what makes a small difference readable: two runs scored on the same 30 probes
    can both have Wilson intervals 0.3 wide and still differ for sure, when one run gets right
    every probe the other does and a few more. `real` is True when the accuracy interval
    excludes 0."""
    a = {r["id"]: r for r in rows_a if r["kind"] == kind}
    pairs = [(a[r["id"]], r) for r in rows_b if r["kind"] == kind and r["id"] in a]
    acc = [float(y["correct"]) - float(x["correct"]) for x, y in pairs
           if x.get("correct") is not None and y.get("correct") is not None]
    lp = [y["target_mean_logprob"] - x["target_mean_logprob"] for x, y in pairs]
    d_acc, d_lp = bootstrap_mean_interval(acc), bootstrap_mean_interval(lp)
    real = bool(d_acc["n"] > 1 and (d_acc["ci_low"] > 0 or d_acc["ci_high"] < 0))
    return {"n": len(pairs), "accuracy": d_acc, "target_logprob": d_lp, "real": real,
            "b_only": sum(1 for d in acc if d > 0), "a_only": sum(1 for d in acc if d < 0)}


def difference_rows(runs: list[Run], stage: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: every run after the first against the first (the reference), at each
    run's last stage unless `stage`, one row per probe kind: Δ accuracy [95% paired bootstrap]
    (* when it excludes 0), how many probes only this run / only the first got right, and Δ
    target log-prob per token. Empty when there are fewer than two runs."""
    if len(runs) < 2:
        return [], []
    header = ["variant", "vs", "kind", "n", "Δ accuracy", "right only here / only there", "Δ log-prob/token"]
    ref = runs[0]
    ref_rows = ref.rows(stage or ref.last_stage())
    rows = []
    for r in runs[1:]:
        mine = r.rows(stage or r.last_stage())
        present = {x["kind"] for x in ref_rows} & {x["kind"] for x in mine}
        for k in order_kinds(present - {"all"}):
            d = paired_difference(ref_rows, mine, k)
            if not d["n"]:
                continue
            da, dl = d["accuracy"], d["target_logprob"]
            rows.append([r.label, ref.label, k, str(d["n"]),
                         "-" if not da["n"] else interval(da, signed=True) + (" *" if d["real"] else ""),
                         "-" if not da["n"] else f"{d['b_only']} / {d['a_only']}",
                         interval(dl, signed=True)])
    return header, rows


def stage_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for multi-stage runs, one row per run: after the base model and after
    each stage, the pooled fact accuracy (every kind but locality) with its Wilson interval,
    the EOS rate of chat answers (qa probes) and the held-out perplexity ratio. The question
    a CPT → SFT recipe asks: did the facts survive SFT, and did the model learn to stop?
    Empty when every run has a single stage."""
    if all(len(r.stages) < 2 for r in runs):
        return [], []
    names: list[str] = []
    for r in runs:
        names += [n for n in r.stages if n not in names]
    header = ["variant", "facts: base"] + [f"facts: {n}" for n in names] + ["qa EOS: base"] + [f"qa EOS: {n}" for n in names] \
        + [f"ppl ×: {n}" for n in names]
    rows = []
    for r in runs:
        summ = r.results.summaries

        def facts(st):
            rec = fact_recall(summ[st]) if st in summ else None
            if not rec or not rec["n"]:
                return "-"
            low, high = wilson_interval(rec["k"], rec["n"])
            return f"{interval({**rec, 'ci_low': low, 'ci_high': high})} ({rec['n']})"

        def eos(st):
            return interval(((summ.get(st) or {}).get("qa") or {}).get("eos"))

        def ppl(st):
            return number(ppl_ratio(r, st) if st in summ else None, prefix="x")

        rows.append([r.label, facts(BASE)] + [facts(n) for n in names] + [eos(BASE)] + [eos(n) for n in names]
                    + [ppl(n) for n in names])
    return header, rows
