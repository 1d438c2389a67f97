"""Which facts survive deployment: a model exported to GGUF at every type (f16, q8_0, q4_0), each
file scored in llama.cpp itself, against the fp32 model in transformers.

`factlab export RUN --survival DIR` writes the files, `DIR/survival.json` (every evaluation's
summaries and perplexities) and `DIR/survival.md` (the table: accuracy and greedy-answer match
per probe kind, damage = relative perplexity increase on the held-out text against fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from factlab.config import EvalSpec
from factlab.evaluate.metrics import damage
from factlab.experiment.evaluation import evaluate_models

REFERENCE = "fp32 (transformers)"
KINDS = ("recall", "paraphrase", "reverse", "qa", "locality")


def _rate(summary: dict, kind: str, stat: str) -> float | None:
    value = (summary.get(kind) or {}).get(stat)
    return value.get("rate") if isinstance(value, dict) else None


def survival_rows(summaries: dict, perplexity: dict) -> list[dict]:
    """One row per evaluation label: {"model", "<kind> acc", "<kind> greedy", "damage"} for the
    kinds present; damage against the first label (the fp32 reference), on the first held-out text."""
    labels = list(summaries)
    kinds = [k for k in KINDS if any(k in summaries[x] for x in labels)]
    rows = []
    for label in labels:
        row = {"model": label}
        for k in kinds:
            row[f"{k} acc"] = _rate(summaries[label], k, "accuracy")
            row[f"{k} greedy"] = _rate(summaries[label], k, "greedy_match")
        ref, own = perplexity.get(labels[0]) or {}, perplexity.get(label) or {}
        name = next(iter(ref), None)
        row["damage"] = (damage(ref[name]["perplexity"], own[name]["perplexity"])
                         if name and name in own else None)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (rates as percentages, damage as a signed percentage)."""
    cols = list(rows[0])

    def cell(col: str, v) -> str:
        if v is None:
            return "-"
        if col == "model":
            return str(v)
        return f"{100 * v:+.1f}%" if col == "damage" else f"{100 * v:.0f}%"

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def quantization_survival(model_dir: Path, out_dir: Path, spec: EvalSpec, types: tuple[str, ...] = ("f16", "q8_0", "q4_0"),
                          *, seed: int = 0, console: Console | None = None) -> list[dict]:
    """Export `model_dir` at every type into `out_dir`, score the fp32 model (transformers) and every
    file (llama.cpp) with `spec`, write survival.json and survival.md there; returns the table's rows."""
    from factlab.models.gguf_export import export_gguf

    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    files = [(t, export_gguf(Path(model_dir), out_dir / f"model-{t}.gguf", t, console=console)) for t in types]
    ref = evaluate_models([(REFERENCE, Path(model_dir))], spec, seed=seed, console=console)
    cpp = evaluate_models([(f"{t} (llama.cpp)", p) for t, p in files], spec, seed=seed, console=console, runtime="llama.cpp")
    summaries = {**ref["summaries"], **cpp["summaries"]}
    perplexity = {**ref["perplexity"], **cpp["perplexity"]}
    rows = survival_rows(summaries, perplexity)
    for row, (t, p) in zip(rows[1:], files):
        row["MB"] = round(p.stat().st_size / 1e6, 1)
    (out_dir / "survival.json").write_text(json.dumps({"rows": rows, "summaries": summaries, "perplexity": perplexity},
                                                      indent=2), encoding="utf-8")
    (out_dir / "survival.md").write_text(markdown_table([{k: v for k, v in r.items() if k != "MB"} for r in rows]),
                                         encoding="utf-8")
    return rows
