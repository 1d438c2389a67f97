"""Run data as tables: load saved runs and lay them side by side."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.table import Table

from factlab.errors import FactlabError
from factlab.evaluate.metrics import wilson_interval
from factlab.evaluate.probes import PROBE_KINDS
from factlab.evaluate.textmetrics import bootstrap_mean_interval


@dataclass
class Run:
    """Everything a report needs from one run folder."""

    folder: Path
    label: str
    config: dict
    results: dict
    loss: dict[str, list[dict]] = field(default_factory=dict)
    """stage name -> loss history (train.json)."""

    @property
    def stages(self) -> list[str]:
        return [s for s in self.results.get("summaries", {}) if s not in ("base", "base+context")]

    def last_stage(self) -> str:
        return (self.stages or ["base"])[-1]

    def rows(self, stage: str) -> list[dict]:
        path = self.folder / "scores" / f"{stage}.jsonl"
        if not path.is_file():
            return []
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def load_run(folder: str | Path, label: str | None = None) -> Run:
    folder = Path(folder)
    res_path = folder / "results.json"
    if not res_path.is_file():
        raise FactlabError(f"{folder} is not a finished run folder (no results.json); give a folder under runs/")
    results = json.loads(res_path.read_text(encoding="utf-8"))
    config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) if (folder / "config.yaml").is_file() else {}
    loss = {}
    for st in results.get("stages", []):
        tj = folder / st.get("folder", "") / "train.json"
        if tj.is_file():
            loss[st["name"]] = json.loads(tj.read_text()).get("loss_history", [])
    return Run(folder, label or folder.name, config, results, loss)


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
    f = run.results.get("forgetting", {}).get(stage) or {}
    ratios = [p["perplexity_ratio"] for p in (f.get("perplexity") or {}).values()]
    return ratios[0] if ratios else None


def locality_delta(run: Run, stage: str) -> float | None:
    return ((run.results.get("forgetting", {}).get(stage) or {}).get("locality") or {}).get("delta")


def kinds_of(runs: list[Run]) -> list[str]:
    present = {k for r in runs for s in r.results.get("summaries", {}).values() for k in s}
    return [k for k in PROBE_KINDS if k in present]


def fmt_rate(x: dict | None) -> str:
    if not x or not x.get("n"):
        return "-"
    return f"{x['rate']:.2f} [{x['ci_low']:.2f},{x['ci_high']:.2f}]"


def variant_rows(runs: list[Run], stage: str | None = None, all_stages: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per run (its last stage unless `stage`; with `all_stages`, one
    row per trained stage, after a row for the first run's base model), accuracy per probe
    kind with its interval, then forgetting and chat format."""
    kinds = kinds_of(runs)
    header = ["variant", "stage"] + [f"{k} (n)" for k in kinds] + ["ppl ratio", "locality Δ", "qa EOS"]
    rows = []

    def row(r: Run, st: str, label: str) -> list[str]:
        summ = r.results.get("summaries", {}).get(st, {})
        cells = [label, st]
        for k in kinds:
            acc = (summ.get(k) or {}).get("accuracy")
            cells.append(f"{fmt_rate(acc)} ({acc['n']})" if acc and acc.get("n") else "-")
        pr, ld = ppl_ratio(r, st), locality_delta(r, st)
        cells += ["-" if pr is None else f"x{pr:.2f}", "-" if ld is None else f"{ld:+.2f}", fmt_rate((summ.get("qa") or {}).get("eos"))]
        return cells

    if all_stages and runs and "base" in runs[0].results.get("summaries", {}):
        rows.append(row(runs[0], "base", "(untrained)"))
    for r in runs:
        for st in (r.stages if all_stages else [stage or r.last_stage()]):
            rows.append(row(r, st, r.label))
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
        for st in r.results.get("stages", []):
            first, last = st.get("first_loss"), st.get("final_loss")
            loss = f"{first:.3f} → {last:.3f}" if first is not None and last is not None else "-"
            held, after = st.get("eval_loss"), st.get("train_loss_after")
            params = st.get("trainable_params")
            share = st.get("trainable_share")
            trainable = f"{params:,} ({share:.3%})" if params is not None and share else (f"{params:,}" if params else "-")
            rss = st.get("train_peak_rss_mb") or st.get("peak_rss_mb")
            merged = "yes" if st.get("merged") else "no: evaluated as base + adapter" if st.get("artifact", "adapter") == "adapter" else "no"
            rows.append([r.label, st.get("name", "?"), st.get("method", "lora"), str(st.get("steps", "-")), loss,
                         "-" if after is None else f"{after:.3f}", "-" if held is None else f"{held:.3f}", f"{st['tokens_per_second']:.0f}" if st.get("tokens_per_second") else "-",
                         trainable, f"{_size(st.get('artifact_bytes'))} {st.get('artifact', '')}".strip(),
                         f"{rss:.0f}" if rss else "-", merged])
    return header, rows


STYLE_COLUMNS = [("length", "words"), ("rouge_l", "ROUGE-L vs training answers"), ("bleu", "BLEU"), ("rep_2", "rep-2"),
                 ("chat_eos", "ends with EOS"), ("chat_length", "tokens")]


def mean_cell(x) -> str:
    """"value [low,high]" of a rate or bootstrap summary; a plain number as is; "-" when empty."""
    if x is None or (isinstance(x, dict) and not x.get("n")):
        return "-"
    if isinstance(x, dict):
        v = x["rate"] if "rate" in x else x["mean"]
        return f"{v:.2f} [{x['ci_low']:.2f},{x['ci_high']:.2f}]"
    return f"{x:.2f}"


def style_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for the answers to the SFT training prompts (runs with an SFT stage):
    one row for the first run's base model, then one per run and stage. Empty rows when no
    run measured style."""
    header = ["variant", "model"] + [label for _, label in STYLE_COLUMNS]
    rows = []
    for i, r in enumerate(runs):
        for label, st in r.results.get("style", {}).items():
            if label.startswith("base") and i > 0:
                continue  # the base model's answers are the same for every variant
            rows.append([r.label if not label.startswith("base") else "(untrained)", f"{label} (n={st.get('n', 0)})"]
                        + [mean_cell(st.get(k)) for k, _ in STYLE_COLUMNS])
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
        for k in [k for k in PROBE_KINDS if k in present] + sorted(present - set(PROBE_KINDS)):
            d = paired_difference(ref_rows, mine, k)
            if not d["n"]:
                continue
            da, dl = d["accuracy"], d["target_logprob"]
            rows.append([r.label, ref.label, k, str(d["n"]),
                         "-" if not da["n"] else f"{da['mean']:+.2f} [{da['ci_low']:+.2f},{da['ci_high']:+.2f}]{' *' if d['real'] else ''}",
                         "-" if not da["n"] else f"{d['b_only']} / {d['a_only']}",
                         f"{dl['mean']:+.2f} [{dl['ci_low']:+.2f},{dl['ci_high']:+.2f}]"])
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
        summ = r.results.get("summaries", {})

        def facts(st):
            rec = fact_recall(summ[st]) if st in summ else None
            if not rec or not rec["n"]:
                return "-"
            low, high = wilson_interval(rec["k"], rec["n"])
            return f"{fmt_rate({**rec, 'ci_low': low, 'ci_high': high})} ({rec['n']})"

        def eos(st):
            return fmt_rate(((summ.get(st) or {}).get("qa") or {}).get("eos"))

        def ppl(st):
            x = ppl_ratio(r, st) if st in summ else None
            return "-" if x is None else f"x{x:.2f}"

        rows.append([r.label, facts("base")] + [facts(n) for n in names] + [eos("base")] + [eos(n) for n in names]
                    + [ppl(n) for n in names])
    return header, rows
