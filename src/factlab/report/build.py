"""The report: one self-contained HTML file (plots embedded as PNG data, no external URL), or
Markdown with the plots written beside it. Built from run folders only."""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from factlab.errors import FactlabError  # noqa: E402
from factlab.experiment.store import RunStore  # noqa: E402
from factlab.report.tables import (  # noqa: E402
    Run, difference_rows, fact_recall, kinds_of, load_run, ppl_ratio, stage_rows, style_rows,
    training_rows, variant_rows,
)


def resolve_runs(sources: list[str], store: RunStore) -> list[tuple[Path, str]]:
    """(run folder, label) for each source: a sweep name in the store (its finished runs, in
    point order, labelled by their overrides) or a run folder."""
    out: list[tuple[Path, str]] = []
    for src in sources:
        if Path(src, "results.json").is_file():
            out.append((Path(src), Path(src).name))
            continue
        rows = [r for r in store.runs(sweep=src, status="done")]
        if not rows:
            raise FactlabError(f"'{src}' is neither a run folder nor a sweep with finished runs in {store.path}; "
                               "see `factlab runs`")
        kept = [r for r in rows if Path(r["run_dir"], "results.json").is_file()]
        if not kept:  # every folder was deleted or moved since the store indexed it
            raise FactlabError(f"the finished runs of sweep '{src}' are no longer on disk (e.g. {rows[0]['run_dir']}); "
                               "run the sweep again or give run folders")
        for r in sorted(kept, key=lambda r: r["run_dir"]):
            out.append((Path(r["run_dir"]), r["label"] or Path(r["run_dir"]).name))
    return out


# ---------------------------------------------------------------------------------------
# Plots


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
        rec = fact_recall(r.results["summaries"].get(st, {}))
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
        labels = [s for s in r.results["summaries"]]
        width = 0.8 / max(1, len(labels))
        for i, st in enumerate(labels):
            vals = [((r.results["summaries"][st].get(k) or {}).get("accuracy") or {}).get("rate") or 0.0 for k in kinds]
            ax.bar([j + i * width for j in range(len(kinds))], vals, width, label=st)
        ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(kinds))])
        ax.set_xticklabels(kinds, fontsize=7, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title(r.label, fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# Samples


def sample_sections(runs: list[Run], probe_ids: list[str], limit: int = 3) -> list[dict]:
    """For each named probe (default: the first `limit` fact probes of the first run), per
    variant and per evaluated model: the greedy answer and the samples (the untrained model's
    once, from the first run)."""
    if not probe_ids and runs:
        rows = runs[0].rows("base")
        probe_ids = [r["id"] for r in rows if r["kind"] != "locality"][:limit]
    out = []
    for pid in probe_ids:
        entries = []
        for i, r in enumerate(runs):
            for st in r.results.get("summaries", {}):
                if i > 0 and st.startswith("base"):
                    continue  # the untrained model answers the same for every variant: shown once
                row = next((x for x in r.rows(st) if x["id"] == pid), None)
                if row:
                    entries.append({"variant": r.label, "stage": st, "greedy": row.get("greedy", ""),
                                    "samples": row.get("samples", []), "prompt": row["prompt"], "target": row["target"]})
        if entries:
            out.append({"id": pid, "prompt": entries[0]["prompt"], "target": entries[0]["target"], "entries": entries})
    return out


# ---------------------------------------------------------------------------------------
# Output

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:first-child,th:first-child,td:nth-child(2){text-align:left}th{background:#f3f3f3}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}code{background:#f6f6f6}.s{color:#555;font-size:12px}"""


def build_report(run_sources: list[tuple[Path, str]], output: Path, fmt: str = "html", probes: list[str] | None = None) -> Path:
    """Write the report for these runs; returns its path."""
    if fmt not in ("html", "md"):
        raise FactlabError(f"unknown report format '{fmt}'; use html or md")
    from factlab.report.influence import build_influence_report, influence_sections, split_influence_runs

    run_sources, influence_sources = split_influence_runs(run_sources)
    if influence_sources and not run_sources:
        return build_influence_report(influence_sources, output, fmt)
    runs = [load_run(folder, label) for folder, label in run_sources]
    if not runs:
        raise FactlabError("no runs to report")
    # The report in reading order: each section is ("table", title, note, header, rows) or
    # ("figure", title, matplotlib figure); empty ones are left out.
    sections: list[tuple] = [
        ("table", "Variants", "Candidate accuracy [95% Wilson interval] (n) per probe kind after each stage of each "
         "run; ppl ratio = held-out perplexity after / before; locality Δ = change of accuracy on facts the base model "
         "knew; qa EOS = share of chat answers that end with EOS.", *variant_rows(runs, all_stages=True)),
        ("table", "Stage by stage", "Per run: accuracy pooled over every fact probe kind (all but locality) [95% Wilson "
         "interval] (n), the EOS rate of chat answers, and held-out perplexity after / before, after the base model and "
         "each stage. Did the facts survive the later stage, and did the model learn to stop?", *stage_rows(runs)),
        ("figure", "Recall versus forgetting (last stage; dashed: Pareto front)", plot_tradeoff(runs)),
        ("table", f"Differences against {runs[0].label}", "Each variant minus the first one, on the same probes "
         "(last stage of each): mean per-probe change of candidate accuracy with a 95% paired bootstrap interval "
         "(* when it excludes 0: the difference is real at that level), how many probes only this variant or only "
         "the first got right, and the change of the target's log-prob per token.", *difference_rows(runs)),
        ("table", "Answers to the SFT training prompts", "Greedy answers to every SFT training prompt: words per "
         "answer, and on the first 50 words ROUGE-L and BLEU against the training answers and the share of repeated "
         "2-grams; mean [95% bootstrap interval].", *style_rows(runs)),
        ("table", "Training", "What each stage cost and how its loss moved. First/last: single logged training "
         "batches (with dropout and NEFTune noise); after / held-out: mean loss over all training / held-out examples "
         "once trained, in eval mode (stages with train.eval_fraction). Saved artefact: the adapter (PEFT format) or, "
         "for full fine-tuning, the model. Prompt, prefix and P-tuning cannot merge into the weights, so their stage "
         "was evaluated as base + adapter (merged: no).", *training_rows(runs)),
        ("figure", "Loss curves", plot_losses(runs)),
        ("figure", "Accuracy per probe kind, before and after each stage", plot_stage_bars(runs)),
    ]
    sections = [s for s in sections if (s[0] == "table" and s[4]) or (s[0] == "figure" and s[2] is not None)]
    sections += influence_sections(influence_sources)
    samples = sample_sections(runs, probes or [])
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    title = f"factlab report: {len(runs)} runs"
    if fmt == "md":
        assets = output.with_name(output.stem + "_files")
        assets.mkdir(exist_ok=True)
        md = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M')} from: " + ", ".join(f"`{r.folder}`" for r in runs)]
        n_fig = 0
        for sec in sections:
            if sec[0] == "table":
                _, t, note, th, trs = sec
                md += ["", f"## {t}", "", note, "", "| " + " | ".join(th) + " |", "|" + "---|" * len(th)]
                md += ["| " + " | ".join(row) + " |" for row in trs]
            else:
                n_fig += 1
                name = f"figure{n_fig}.png"
                (assets / name).write_bytes(_png(sec[2]))
                md += ["", f"## {sec[1]}", "", f"![{sec[1]}]({assets.name}/{name})"]
        for s in samples:
            md += ["", f"## Answers to `{s['id']}`: {s['prompt']} → **{s['target']}**", ""]
            for e in s["entries"]:
                md.append(f"- {e['variant']} / {e['stage']}: greedy `{e['greedy'].strip()}`; samples: "
                          + "; ".join(f"`{x.strip()}`" for x in e["samples"]))
        output.write_text("\n".join(md) + "\n", encoding="utf-8")
        return output
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1><p class='s'>Generated {time.strftime('%Y-%m-%d %H:%M')} from "
             + ", ".join(f"<code>{esc(str(r.folder))}</code>" for r in runs) + "</p>"]
    for sec in sections:
        if sec[0] == "table":
            _, t, note, th, trs = sec
            parts.append(f"<h2>{esc(t)}</h2><p class='s'>{esc(note)}</p><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in th) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in trs]
            parts.append("</table>")
        else:
            data = base64.b64encode(_png(sec[2])).decode()
            parts.append(f"<h2>{esc(sec[1])}</h2><img alt='{esc(sec[1])}' src='data:image/png;base64,{data}'>")
    for s in samples:
        parts.append(f"<h2>Answers to <code>{esc(s['id'])}</code></h2><p>{esc(s['prompt'])} → <b>{esc(s['target'])}</b></p>"
                     "<table><tr><th>variant</th><th>model</th><th>greedy</th><th>samples</th></tr>")
        for e in s["entries"]:
            parts.append(f"<tr><td>{esc(e['variant'])}</td><td>{esc(e['stage'])}</td><td style='text-align:left'>{esc(e['greedy'])}</td>"
                         f"<td style='text-align:left'>{'<br>'.join(esc(x) for x in e['samples'])}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    output.write_text("\n".join(parts), encoding="utf-8")
    return output
