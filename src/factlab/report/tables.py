"""Run data as tables: load saved runs and lay them side by side."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.table import Table

from factlab.errors import FactlabError
from factlab.evaluate.probes import PROBE_KINDS


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


def variant_rows(runs: list[Run], stage: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per run (its last stage unless `stage`), accuracy per probe
    kind with its interval, then forgetting and chat format."""
    kinds = kinds_of(runs)
    header = ["variant", "stage"] + [f"{k} (n)" for k in kinds] + ["ppl ratio", "locality Δ", "qa EOS"]
    rows = []
    for r in runs:
        st = stage or r.last_stage()
        summ = r.results.get("summaries", {}).get(st, {})
        cells = [r.label, st]
        for k in kinds:
            acc = (summ.get(k) or {}).get("accuracy")
            cells.append(f"{fmt_rate(acc)} ({acc['n']})" if acc and acc.get("n") else "-")
        pr, ld = ppl_ratio(r, st), locality_delta(r, st)
        cells += ["-" if pr is None else f"x{pr:.2f}", "-" if ld is None else f"{ld:+.2f}", fmt_rate((summ.get("qa") or {}).get("eos"))]
        rows.append(cells)
    return header, rows


def compare_table(runs: list[Run], stage: str | None = None) -> Table:
    header, rows = variant_rows(runs, stage)
    table = Table(title="runs side by side (candidate accuracy [95% CI] (n); forgetting vs base)")
    for h in header:
        table.add_column(h, justify="left" if h in ("variant", "stage") else "right")
    for row in rows:
        table.add_row(*row)
    return table
