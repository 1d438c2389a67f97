"""Console tables (rich) of one run's results, printed by the CLI after `factlab run`, after
each sweep point and by `factlab eval`."""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table

from factlab.evaluate.priming import leaked_text
from factlab.experiment.run_folder import BASE, RunResults
from factlab.report.format import change, interval, number, order_kinds

# (key in a kind's summary, label): rows of the summary table, shown when any stage has them.
TABLE_METRICS = (
    ("accuracy", "accuracy"),
    ("greedy_match", "greedy match"),
    ("target_logprob", "target log-prob/token"),
    ("sample_hit", "sample hit"),
    ("eos", "ends with EOS"),
    ("answer_tokens", "answer tokens"),
)

STYLE_COLUMNS = [("length", "words"), ("rouge_l", "ROUGE-L vs training answers"), ("bleu", "BLEU"), ("rep_2", "rep-2"),
                 ("chat_eos", "ends with EOS"), ("chat_length", "tokens")]
"""(key in a style summary, column label): the answers to the SFT training prompts."""


def summary_table(summaries: Mapping[str, Mapping[str, Mapping]], title: str,
                  baseline: str | None = BASE) -> Table:
    """A rich table of ``{label: summarize(rows)}``: one column per evaluation; per probe kind
    a row per metric as "value [95% CI]", and after the baseline's column the change against
    the ``baseline`` evaluation. n is in the metric column (the same probes are scored at
    every stage)."""
    table = Table(title=title)
    table.add_column("kind")
    table.add_column("metric (n)")
    for stage in summaries:
        table.add_column(stage, justify="right")
    kinds = order_kinds(k for s in summaries.values() for k in s)
    base = summaries.get(baseline) if baseline else None
    for i, kind in enumerate(kinds):
        metrics = [(m, label) for m, label in TABLE_METRICS
                   if any(s.get(kind, {}).get(m) for s in summaries.values())]
        for j, (metric, label) in enumerate(metrics):
            stats = [s.get(kind, {}).get(metric) for s in summaries.values()]
            ref = base.get(kind, {}).get(metric) if base else None
            n = max((st["n"] for st in stats if st), default=0)
            cells = []
            for name, st in zip(summaries, stats):
                delta = None if name == baseline else change(st, ref)
                cells.append(interval(st) + (f"\n{delta}" if delta and interval(st) != "-" else ""))
            table.add_row(kind if j == 0 else "", f"{label} ({n})", *cells,
                          style="bold" if kind == "all" else None,
                          end_section=j == len(metrics) - 1 and i < len(kinds) - 1)
    return table


def priming_cell(x: Mapping | None) -> str:
    """"0.07 (4/56)": a priming rate summary as share (answers with a leaked name / answers)."""
    if not x or not x.get("n"):
        return "-"
    return f"{x['rate']:.2f} ({x['k']}/{x['n']})"


def forgetting_table(perplexity: Mapping[str, Mapping], forgetting: Mapping[str, Mapping], baseline: str = BASE) -> Table:
    """Per model: held-out perplexity (and its ratio to the baseline), the damage figure
    (relative perplexity increase), the change of locality against the baseline, both as
    candidate accuracy and as greedy answers (the one that shows when a model still ranks a
    known fact first but no longer says it), and when measured, priming: the share of answers
    to locality probes and general prompts with a trained name the baseline did not say there
    (the baseline's row: its own raw share), and the names that leaked most."""
    primed = any(f.get("priming") for f in forgetting.values())
    table = Table(title="forgetting (held-out perplexity, damage = relative perplexity increase, locality"
                        + (", priming = answers with a trained name)" if primed else ")"))
    table.add_column("model")
    base = perplexity.get(baseline, {})
    for n in base:
        table.add_column(f"ppl {n}", justify="right")
    table.add_column("damage", justify="right")
    table.add_column("locality acc. change", justify="right")
    table.add_column("locality greedy change", justify="right")
    if primed:
        table.add_column("priming", justify="right")
        table.add_column("leaked names")
        before = next(f["priming"]["before"] for f in forgetting.values() if f.get("priming"))
    table.add_row(baseline, *[f"{base[n]['perplexity']:.2f}" for n in base], "", "", "",
                  *([priming_cell(before), ""] if primed else []))
    for label, f in forgetting.items():
        ppl = perplexity.get(label, {})
        cells = [f"{ppl[n]['perplexity']:.2f} (x{ppl[n]['perplexity'] / base[n]['perplexity']:.2f})" if n in ppl else "-" for n in base]
        pr = f.get("priming") or {}
        table.add_row(label, *cells, number(f.get("damage"), "{:+.1%}"),
                      number((f.get("locality") or {}).get("delta"), "{:+.2f}"),
                      number((f.get("locality_greedy") or {}).get("delta"), "{:+.2f}"),
                      *([priming_cell(pr.get("after")), leaked_text(pr.get("leaked"))] if primed else []))
    return table


def style_table(style: Mapping[str, Mapping]) -> Table:
    """Answers to the SFT training prompts, per model: overlap with the training answers,
    repetition, length and whether the answer ends with EOS (mean [95% CI])."""
    table = Table(title="answers to the SFT prompts (first 50 words vs the training answers)")
    table.add_column("model")
    for _, label in STYLE_COLUMNS:
        table.add_column(label, justify="right")
    for label, st in style.items():
        table.add_row(f"{label} (n={st['n']})", *[interval(st.get(k)) for k, _ in STYLE_COLUMNS])
    return table


def target_value(metric: str, results: RunResults, label: str) -> tuple[float | None, str]:
    """(value, how it is shown) of an eval.targets metric for the evaluation `label`."""
    forgetting = results.forgetting.get(label) or {}
    if metric == "damage":
        v = forgetting.get("damage")
        return (None, "-") if v is None else (float(v), f"{100 * v:+.1f}%")
    if metric == "priming":
        after = (forgetting.get("priming") or {}).get("after") or {}
        if after.get("rate") is None:
            return None, "not measured"
        leaked = ", ".join(list((forgetting.get("priming") or {}).get("leaked") or {})[:3])
        return float(after["rate"]), f"{after['rate']:.2f} ({after['k']}/{after['n']}{'; ' + leaked if leaked else ''})"
    if metric == "locality.greedy_drop":
        greedy = forgetting.get("locality_greedy") or {}
        before, after = (greedy.get("before") or {}).get("rate"), (greedy.get("after") or {}).get("rate")
        if before is None or after is None:
            return None, "-"
        return before - after, f"{before - after:+.2f} ({before:.2f} -> {after:.2f})"
    kind, _, stat = metric.partition(".")
    cell = (results.summaries.get(label) or {}).get(kind, {}).get(stat)
    if not isinstance(cell, dict) or cell.get("rate") is None:
        return None, "-"
    return float(cell["rate"]), f"{cell['rate']:.2f} [{cell['ci_low']:.2f},{cell['ci_high']:.2f}] (n={cell['n']})"


def targets_table(results: RunResults, targets: Mapping[str, str]) -> Table | None:
    """The run's eval.targets against what its last evaluation measured."""
    label = (results.trained_labels or list(results.evaluations))[-1:]
    if not targets or not label:
        return None
    label = label[0]
    table = Table(title=f"targets, after {label}")
    for col in ("metric", "target", "measured", "met"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for metric, goal in targets.items():
        op, bound = goal.strip()[:2], float(goal.strip()[2:])
        value, shown = target_value(metric, results, label)
        met = "?" if value is None else ("yes" if (value >= bound if op == ">=" else value <= bound) else "no")
        shown_goal = f"{op} {100 * bound:+.0f}%" if metric == "damage" else f"{op} {bound:g}"
        table.add_row(metric, shown_goal, shown, met, style=None if met != "no" else "yellow")
    return table


def print_run(console: Console, results: RunResults, targets: Mapping[str, str] | None = None) -> None:
    """The tables `factlab run` prints at the end of a run: probes by kind, forgetting, style,
    and the experiment's eval.targets against the last evaluation."""
    if any(results.summaries.values()):
        console.print(summary_table(results.summaries, title=f"{results.name}: probes by kind (rate [95% CI] change vs base)"))
    if results.forgetting:
        console.print(forgetting_table(results.perplexity, results.forgetting))
    if results.style:
        console.print(style_table(results.style))
    if targets and (table := targets_table(results, targets)) is not None:
        console.print(table)
