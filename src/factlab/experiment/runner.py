"""Run an experiment: load the model, score the probes, then for every stage train → merge →
save → score again, and write the results beside the run.

Run folder layout::

    runs/<name>-<timestamp>/
      config.yaml              resolved experiment (absolute paths, seed)
      results.json             per stage: training metrics and probe summaries (rewritten after each stage)
      scores/base.jsonl        per-probe rows of the untrained model
      scores/<stage>.jsonl     ... after each stage
      stages/<i>-<stage>/      adapter/ (PEFT), merged/ (plain transformers), train.json, loss.png

Everything that can be checked without training (data files, probes, layer groups, chat
template) is checked before the first write, so bad input never leaves a half-made run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from factlab.config import Experiment, dump_experiment
from factlab.data.sft import require_chat_template
from factlab.errors import FactlabError
from factlab.evaluate.facts import score_probes, summarize, summary_table
from factlab.evaluate.probes import Probe, load_probes
from factlab.models.loading import load_model, resolve_model
from factlab.models.targets import resolve_targets
from factlab.train.stage import build_stage_examples, load_stage_data, train_stage


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a truncated file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_rows(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def new_run_dir(root: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        d = root / (f"{name}-{stamp}" + (f"-{i}" if i else ""))
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise FactlabError(f"cannot create a run folder under {root}")


def _stage_inputs(exp: Experiment, i: int) -> tuple[list[str] | None, str | None]:
    st = exp.stages[i]
    return st.data.corpus or exp.data.corpus, st.data.qa or exp.data.qa


def run_experiment(exp: Experiment, console: Console | None = None, run_dir: Path | None = None) -> Path:
    """Run every stage of `exp`; return the run folder."""
    console = console or Console(stderr=True)
    names = exp.stage_names()

    # --- preflight: everything a user can get wrong, before any write ------------------------
    probes: list[Probe] = []
    for p in exp.eval.probes:
        probes.extend(load_probes(p))
    ids = [p.id for p in probes]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise FactlabError(f"probe ids repeat across the probe files: {dup}; make ids unique")
    raw_data = [load_stage_data(st, *_stage_inputs(exp, i)) for i, st in enumerate(exp.stages)]
    model_path = resolve_model(exp.model, console)
    model, tokenizer = load_model(model_path)
    if any(st.kind == "sft" for st in exp.stages):
        require_chat_template(tokenizer, "SFT stages")
    if any(p.kind == "qa" for p in probes):
        require_chat_template(tokenizer, "qa probes")
    stage_examples = []
    for st, raw in zip(exp.stages, raw_data):
        resolve_targets(model, list(st.peft.targets), st.peft.layers)  # unknown groups fail here
        stage_examples.append(build_stage_examples(st, tokenizer, raw))

    # --- the run ------------------------------------------------------------------------------
    run_dir = run_dir or new_run_dir(Path(exp.output_dir), exp.name)
    (run_dir / "scores").mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", dump_experiment(exp))
    console.print(f"run folder: [bold]{run_dir}[/bold]  (model {model_path})")
    results: dict = {"name": exp.name, "model": str(model_path), "seed": exp.seed, "stages": [], "summaries": {}}

    def evaluate(label: str, m) -> None:
        if not probes:
            return
        t0 = time.perf_counter()
        with console.status(f"scoring {len(probes)} probes ({label}) ..."):
            rows = score_probes(m, tokenizer, probes, batch_size=exp.eval.batch_size, greedy_tokens=exp.eval.greedy_tokens)
        write_rows(run_dir / "scores" / f"{label}.jsonl", rows)
        results["summaries"][label] = summarize(rows)
        console.print(f"[dim]scored {len(probes)} probes on {label} in {time.perf_counter() - t0:.1f} s[/dim]")

    evaluate("base", model)
    write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    for i, (st, name) in enumerate(zip(exp.stages, names)):
        out = run_dir / "stages" / f"{i + 1}-{name}"
        model, res = train_stage(model, tokenizer, st, name, out, stage_examples[i], exp.seed, console)
        console.print(
            f"stage {name}: {res.steps} steps, loss {res.first_loss:.3f} → {res.final_loss:.3f}, "
            f"{res.tokens_per_second:,.0f} tok/s{' (bf16)' if res.bf16 else ''}, {res.seconds:.0f} s"
        )
        evaluate(name, model)
        stage_entry = {k: v for k, v in asdict(res).items() if k != "loss_history"}
        stage_entry["folder"] = str(out.relative_to(run_dir))
        results["stages"].append(stage_entry)
        write_atomic(run_dir / "results.json", json.dumps(results, indent=2))

    if probes:
        console.print(summary_table(results["summaries"], title=f"{exp.name}: fact recall by probe kind"))
    console.print(f"results: {run_dir / 'results.json'}")
    return run_dir
