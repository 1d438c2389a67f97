"""The report: one self-contained HTML file (plots embedded as PNG data, no external URL), or
Markdown with the plots written beside it. Built from run folders only."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from factlab.errors import FactlabError
from factlab.experiment.run_folder import BASE, RunFolder
from factlab.experiment.store import RunStore
from factlab.report.plots import plot_losses, plot_stage_bars, plot_tradeoff, png
from factlab.report.tables import (
    Run, difference_rows, load_run, priming_rows, sample_hit_rows, stage_rows, style_rows, training_rows, variant_rows,
)


def resolve_runs(sources: list[str], store: RunStore) -> list[tuple[Path, str]]:
    """(run folder, label) for each source: a sweep name in the store (its finished runs, in
    point order, labelled by their overrides) or a run folder."""
    out: list[tuple[Path, str]] = []
    for src in sources:
        if RunFolder.is_run(src):
            out.append((Path(src), Path(src).name))
            continue
        rows = [r for r in store.runs(sweep=src, status="done")]
        if not rows:
            raise FactlabError(f"'{src}' is neither a run folder nor a sweep with finished runs in {store.path}; "
                               "see `factlab runs`")
        kept = [r for r in rows if RunFolder.is_run(r["run_dir"])]
        if not kept:  # every folder was deleted or moved since the store indexed it
            raise FactlabError(f"the finished runs of sweep '{src}' are no longer on disk (e.g. {rows[0]['run_dir']}); "
                               "run the sweep again or give run folders")
        for r in sorted(kept, key=lambda r: r["run_dir"]):
            out.append((Path(r["run_dir"]), r["label"] or Path(r["run_dir"]).name))
    return out


# ---------------------------------------------------------------------------------------
# Samples


def sample_sections(runs: list[Run], probe_ids: list[str], limit: int = 3) -> list[dict]:
    """For each named probe (default: the first `limit` fact probes of the first run), per
    variant and per evaluated model: the greedy answer and the samples (the untrained model's
    once, from the first run)."""
    if not probe_ids and runs:
        rows = runs[0].rows(BASE)
        probe_ids = [r["id"] for r in rows if r["kind"] != "locality"][:limit]
    out = []
    for pid in probe_ids:
        entries = []
        for i, r in enumerate(runs):
            for st in r.results.evaluations:
                if i > 0 and r.results.is_untrained(st):
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


def build_report(run_sources: list[tuple[Path, str]], output: Path, fmt: str = "html", probes: list[str] | None = None,
                 extra: list[tuple] | None = None) -> Path:
    """Write the report for these runs; returns its path. `extra`: sections put first (a
    tuning study's, from report.tune.tune_sections)."""
    if fmt not in ("html", "md"):
        raise FactlabError(f"unknown report format '{fmt}'; use html or md")
    from factlab.report.influence import build_influence_report, influence_sections, split_influence_runs

    run_sources, influence_sources = split_influence_runs(run_sources)
    if influence_sources and not run_sources:
        return build_influence_report(influence_sources, output, fmt)
    runs = [load_run(folder, label) for folder, label in run_sources]
    if not runs and not extra:
        raise FactlabError("no runs to report")
    # The report in reading order: each section is ("table", title, note, header, rows) or
    # ("figure", title, matplotlib figure); empty ones are left out.
    sections: list[tuple] = [
        ("table", "Variants", "Candidate accuracy [95% Wilson interval] (n) per probe kind after each stage of each "
         "run; damage = relative increase of held-out general-text perplexity (+15% = 1.15 times the base model's); "
         "priming = share of greedy answers to locality probes and general prompts that contain a trained name "
         "the base model did not say there (k/n; the untrained row: its own share); "
         "locality Δ = change of candidate accuracy on facts the base model knew, locality greedy Δ = change of the "
         "share whose greedy answer still contains the fact; qa EOS = share of chat answers that end with EOS.", *variant_rows(runs, all_stages=True)),
        ("table", "Priming: trained names where they do not belong", "Greedy answers to the locality probes and to "
         "factlab's general prompts (\"Her brother's name is\", ...) that contain a name the model was trained on "
         "(a target of the fact probes; numbers and common English words left out) and that the base model's answer "
         "to the same prompt did not contain: share [95% Wilson interval] (k/n) overall and per set, the leaked names "
         "with their counts, and the first such answer. scores/<stage>.priming.jsonl has every answer.",
         *priming_rows(runs)),
        ("table", "Sampled answers that contain the target", "Per probe kind: the share of all sampled answers (n "
         "per probe at the eval temperature, pooled over the kind's probes) whose text contains the target, k/n with "
         "a 95% Wilson interval; samples of one probe are not independent, so the interval is optimistic.",
         *sample_hit_rows(runs)),
        ("table", "Stage by stage", "Per run: accuracy pooled over every fact probe kind (all but locality) [95% Wilson "
         "interval] (n), the EOS rate of chat answers, and held-out perplexity after / before, after the base model and "
         "each stage. Did the facts survive the later stage, and did the model learn to stop?", *stage_rows(runs)),
        ("figure", "Recall versus forgetting (last stage; dashed: Pareto front)", plot_tradeoff(runs)),
        ("table", f"Differences against {runs[0].label if runs else ''}", "Each variant minus the first one, on the same probes "
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
    sections = [s for s in list(extra or []) + sections if (s[0] == "table" and s[4]) or (s[0] == "figure" and s[2] is not None)]
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
                (assets / name).write_bytes(png(sec[2]))
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
            data = base64.b64encode(png(sec[2])).decode()
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
