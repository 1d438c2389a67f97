"""Influence runs (`factlab influence`) in the report: the heatmaps and the desiderata table.

An influence run folder is read through experiment.run_folder (`RunFolder.read_influence`,
`read_matrices`). ``influence_sections`` turns such folders into report sections in the
same ("table", title, note, header, rows) / ("figure", title, matplotlib figure) form the report
builder renders; ``build_influence_report`` writes a report of influence runs alone (HTML with
the plots embedded, or Markdown with PNGs beside it); ``desiderata_table`` is the console's
table. Nothing here loads a model.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from factlab.errors import FactlabError
from factlab.experiment.run_folder import InfluenceResults, RunFolder
from factlab.report.plots import png

if TYPE_CHECKING:
    from rich.table import Table


def is_influence_run(folder: Path) -> bool:
    """Whether ``folder`` holds an influence run."""
    return RunFolder(folder).is_influence()


def split_influence_runs(sources: list[tuple[Path, str]]) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(training runs, influence runs) of the report's (folder, label) sources, order kept."""
    inf = [s for s in sources if is_influence_run(s[0])]
    return [s for s in sources if s not in inf], inf


def desiderata_table(results: InfluenceResults) -> Table:
    """The console table: one desideratum per line, fine-tuning and in-context side by side."""
    from rich.table import Table

    from factlab.influence.study import fmt_interval, label_of

    des = results.desiderata
    table = Table(title=f"influence desiderata, mean [95% bootstrap interval] (n): {results.name}")
    table.add_column("desideratum")
    table.add_column("fine-tuning")
    table.add_column("in-context")
    for key in des.finetune:
        table.add_row(label_of(key), fmt_interval(des.finetune[key]), fmt_interval((des.in_context or {}).get(key)))
    return table


def _matrix_figure(M: np.ndarray, row_ids: list[str], col_ids: list[str], title: str):
    from factlab.influence.study import heatmap_figure

    return heatmap_figure(M, row_ids, col_ids, title)


def _g(x: float | None) -> str:
    return "?" if x is None else f"{x:g}"


def influence_sections(sources: list[tuple[Path, str]]) -> list[tuple]:
    """Per influence run: the desiderata table (fine-tuning and in-context side by side, with
    intervals), the timing, and the two heatmaps."""
    from factlab.influence.study import fmt_interval, label_of

    sections: list[tuple] = []
    for folder, label in sources:
        run = RunFolder(folder)
        res = run.read_influence()
        des = res.desiderata
        ctx = des.in_context or {}
        rows = [[label_of(k), fmt_interval(v), fmt_interval(ctx.get(k))] for k, v in des.finetune.items()]
        sched, t = res.schedule, res.timing
        note = (f"{res.n_rows} rows ({res.n_clean_rows} samples, the rest noised copies) x {res.n_columns} "
                f"columns on {res.model}; {res.peft.get('method')} on {', '.join(res.peft.get('targets') or [])}, "
                f"{sched.steps} {sched.optimizer} step(s) at lr {_g(sched.lr)} per sample, seeds {res.seeds}. "
                f"EIF[i, j] = L_j(after training on i) − L_j(before), nats per token: negative = i helped j. "
                f"Mean [95% bootstrap interval] (n).")
        if t.finetune_seconds is not None and t.finetune_seconds_per_row is not None:  # not recorded by early runs
            note += (f" Fine-tuning took {t.finetune_seconds_per_row:.2f} s per row, {t.finetune_seconds:.0f} s for the matrix"
                     + (f"; in-context {t.in_context_seconds:.0f} s." if t.in_context_seconds is not None else "."))
        sections.append(("table", f"Influence desiderata: {label}", note, ["desideratum", "fine-tuning", "in-context"], rows))
        z = run.read_matrices()
        sections.append(("figure", f"Fine-tuning influence: {label} (blue: training on the row lowered the column's loss)",
                         _matrix_figure(z.eif_mean, z.row_ids, z.col_ids, f"{res.name}: fine-tuning EIF")))
        if z.eif_ctx is not None:
            sections.append(("figure", f"In-context influence: {label} (the row's text in the prompt)",
                             _matrix_figure(z.eif_ctx, z.row_ids, z.col_ids, f"{res.name}: in-context EIF")))
    return sections


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%;border:1px solid #eee;margin:0.5em 0}.s{color:#555;font-size:12px}")


def build_influence_report(sources: list[tuple[Path, str]], output: Path, fmt: str = "html") -> Path:
    """A report of influence runs alone: one self-contained HTML file, or Markdown + PNGs."""
    if fmt not in ("html", "md"):
        raise FactlabError(f"unknown report format '{fmt}'; use html or md")
    sections = influence_sections(sources)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    title = f"factlab influence report: {len(sources)} run(s)"
    stamp = time.strftime("%Y-%m-%d %H:%M")
    if fmt == "md":
        assets = output.with_name(output.stem + "_files")
        assets.mkdir(exist_ok=True)
        md = [f"# {title}", "", f"Generated {stamp} from: " + ", ".join(f"`{f}`" for f, _ in sources)]
        for n, sec in enumerate(sections):
            if sec[0] == "table":
                _, t, note, th, trs = sec
                md += ["", f"## {t}", "", note, "", "| " + " | ".join(th) + " |", "|" + "---|" * len(th)]
                md += ["| " + " | ".join(r) + " |" for r in trs]
            else:
                (assets / f"influence{n}.png").write_bytes(png(sec[2]))
                md += ["", f"## {sec[1]}", "", f"![{sec[1]}]({assets.name}/influence{n}.png)"]
        output.write_text("\n".join(md) + "\n", encoding="utf-8")
        return output
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1><p class='s'>Generated {stamp} from "
             + ", ".join(f"<code>{esc(str(f))}</code>" for f, _ in sources) + "</p>"]
    for sec in sections:
        if sec[0] == "table":
            _, t, note, th, trs = sec
            parts.append(f"<h2>{esc(t)}</h2><p class='s'>{esc(note)}</p><table><tr>"
                         + "".join(f"<th>{esc(h)}</th>" for h in th) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in trs]
            parts.append("</table>")
        else:
            data = base64.b64encode(png(sec[2])).decode()
            parts.append(f"<h2>{esc(sec[1])}</h2><img alt='{esc(sec[1])}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    output.write_text("\n".join(parts), encoding="utf-8")
    return output
