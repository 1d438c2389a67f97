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
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from factlab.config import Experiment, dump_experiment
from factlab.data.corpus import load_documents
from factlab.data.sft import require_chat_template
from factlab.errors import FactlabError
from factlab.evaluate.facts import summary_table
from factlab.evaluate.lm import max_positions
from factlab.experiment.evaluation import Evaluator, forgetting, load_probe_files, write_atomic
from factlab.experiment.store import RunStore
from factlab.models.loading import load_model, resolve_model
from factlab.models.targets import resolve_targets
from factlab.train.peft_methods import check_stage_order
from factlab.train.stage import build_stage_examples, load_stage_data, train_stage


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


def run_experiment(exp: Experiment, console: Console | None = None, run_dir: Path | None = None,
                   store: RunStore | None = None, sweep: str | None = None, point: dict | None = None,
                   label: str | None = None, mlflow: bool = False, base_cache: dict | None = None) -> Path:
    """Run every stage of `exp`; return the run folder. With a `store`, the run is indexed
    there: `running` when its folder is created, `done` with its metrics at the end, `failed`
    with the error if it raises."""
    console = console or Console(stderr=True)
    names = exp.stage_names()

    # --- preflight: everything a user can get wrong, before any write ------------------------
    if mlflow:
        from factlab.experiment.mlflow_log import require_mlflow

        require_mlflow()
    check_stage_order(exp.stages)  # a stage after a prompt method (cannot merge) fails here, not after training
    probes = load_probe_files(exp.eval.probes)
    raw_data = [load_stage_data(st, *_stage_inputs(exp, i), substitute=st.data.substitute or exp.data.substitute)
                for i, st in enumerate(exp.stages)]
    context = None
    if exp.eval.in_context:
        corpus = exp.data.corpus or next((st.data.corpus for st in exp.stages if st.data.corpus), None)
        if not corpus:
            raise FactlabError("eval.in_context puts the corpus in the prompt, but the experiment has no data.corpus")
        docs = load_documents(corpus)
        if exp.data.substitute:
            from factlab.data.substitute import substitute

            docs = [substitute(d, exp.data.substitute)[0] for d in docs]
        context = "\n\n".join(docs)
    model_path = resolve_model(exp.model, console)
    model, tokenizer = load_model(model_path)
    if any(st.kind == "sft" for st in exp.stages):
        require_chat_template(tokenizer, "SFT stages")
    if any(p.kind == "qa" for p in probes):
        require_chat_template(tokenizer, "qa probes")
    from factlab.experiment.preflight import check_probe_lengths

    check_probe_lengths(probes, tokenizer, model)
    stage_examples = []
    for st, raw in zip(exp.stages, raw_data):
        resolve_targets(model, list(st.peft.targets), st.peft.layers)  # unknown groups fail here
        stage_examples.append(build_stage_examples(st, tokenizer, raw, seed=st.train.seed if st.train.seed is not None else exp.seed))
    if context is not None:
        n_ctx = len(tokenizer(context)["input_ids"])
        limit = max_positions(model) or float("inf")  # None: no fixed context (ALiBi), any corpus fits
        if n_ctx > limit // 2:
            raise FactlabError(f"eval.in_context: the corpus is {n_ctx} tokens, too long to put in a prompt "
                               f"of this model (context {limit}); turn in_context off or use a shorter corpus")

    # --- the run ------------------------------------------------------------------------------
    run_dir = run_dir or new_run_dir(Path(exp.output_dir), exp.name)
    (run_dir / "scores").mkdir(parents=True, exist_ok=True)
    if store is not None:
        store.start(run_dir, exp.name, exp.model_dump(mode="json"), sweep=sweep, point=point, label=label)
    try:
        results = _run(exp, console, run_dir, model, tokenizer, model_path, probes, raw_data, stage_examples, context, names,
                       base_cache)
    except BaseException as e:
        if store is not None:
            store.fail(run_dir, f"{type(e).__name__}: {e}")
        raise
    if store is not None:
        store.finish(run_dir, results)
    if mlflow:
        from factlab.experiment.mlflow_log import log_run

        log_run(run_dir, exp.model_dump(mode="json"), results, experiment=sweep or exp.name)
    return run_dir


def base_cache_key(exp: Experiment, model_path: Path, raw_data) -> str:
    """What the untrained model's evaluation depends on: the model, the eval settings and
    their files' contents, the seed, the SFT prompts (style) and the in-context corpus."""
    import hashlib

    parts = {"model": str(model_path), "eval": exp.eval.model_dump(mode="json"), "seed": exp.seed,
             "files": [Path(p).read_bytes().hex() for p in exp.eval.probes + exp.eval.general_text],
             "sft": next((raw.main for st, raw in zip(exp.stages, raw_data) if st.kind == "sft"), None),
             "context": [exp.data.corpus, exp.data.substitute] if exp.eval.in_context else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def stage_cache_key(base_key: str, exp: Experiment, i: int, stage_examples: list) -> str:
    """What stages 0..i produce depends on: everything the base evaluation does (base_key),
    those stages' settings and names, and the exact training examples they saw."""
    import hashlib

    parts = {"base": base_key, "stages": [st.model_dump(mode="json") for st in exp.stages[: i + 1]],
             "names": exp.stage_names()[: i + 1]}
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for examples in stage_examples[: i + 1]:  # token ids streamed, not one JSON string of the corpus
        for ex in examples:
            h.update(json.dumps(ex, sort_keys=True).encode())
        h.update(b"\0")  # stage boundary
    return h.hexdigest()


def _link_or_copy(src, dst):
    """Hard-link a finished file (never modified afterwards); copy across file systems."""
    import os

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _run(exp, console, run_dir, model, tokenizer, model_path, probes, raw_data, stage_examples, context, names,
         base_cache: dict | None = None) -> dict:
    """The run proper, after preflight: evaluations and stages; returns results.json's content.

    `base_cache` (a sweep passes one dict to all its points) reuses work that sweep points
    share, because it is deterministic on CPU and repeating it would cost as much as the new
    work: the untrained model's evaluation across runs whose base_cache_key matches, and a
    merged stage that is not the last one (the CPT stage of a sweep over SFT settings) across
    runs whose stage_cache_key matches. A reused stage's folder is hard-linked from the run
    that trained it, its model loaded from its merged/ folder, and its entry in results.json
    says `reused_from`."""
    write_atomic(run_dir / "config.yaml", dump_experiment(exp))
    console.print(f"run folder: [bold]{run_dir}[/bold]  (model {model_path})")
    sft_convs = next((raw.main for st, raw in zip(exp.stages, raw_data) if st.kind == "sft"), None)
    evaluator = Evaluator(exp.eval, probes, tokenizer, seed=exp.seed, scores_dir=run_dir / "scores", console=console,
                          conversations=sft_convs)
    results: dict = {"name": exp.name, "model": str(model_path), "seed": exp.seed, "stages": [],
                     "summaries": {}, "perplexity": {}, "forgetting": {}, "style": {}}

    def record(label: str, ev: dict) -> None:
        results["summaries"][label] = ev["probes"]
        results["perplexity"][label] = ev["perplexity"]
        if ev.get("style"):
            results["style"][label] = ev["style"]
        write_atomic(run_dir / "results.json", json.dumps(results, indent=2))

    key = base_cache_key(exp, model_path, raw_data) if base_cache is not None else None
    if key is not None and key in base_cache:
        source, cached = base_cache[key]
        console.print(f"[dim]base evaluation reused from {source} (same model, probes and settings)[/dim]")
        for f in (source / "scores").glob("base*.jsonl"):
            shutil.copyfile(f, run_dir / "scores" / f.name)
        for label, ev in cached.items():
            record(label, ev)
        base_eval = cached["base"]
    else:
        base_eval = evaluator.evaluate("base", model)
        record("base", base_eval)
        cached = {"base": base_eval}
        if context is not None:
            cached["base+context"] = evaluator.evaluate("base+context", model, context=context, with_perplexity=False)
            record("base+context", cached["base+context"])
        if key is not None:
            base_cache[key] = (run_dir, cached)
    for i, (st, name) in enumerate(zip(exp.stages, names)):
        out = run_dir / "stages" / f"{i + 1}-{name}"
        skey = (stage_cache_key(key, exp, i, stage_examples) if key is not None and i < len(exp.stages) - 1 else None)
        hit = base_cache.get(("stage", skey)) if skey is not None else None
        if hit is not None and (hit[0] / hit[1]["folder"] / "merged").is_dir():
            source, entry, ev = hit
            shutil.copytree(source / entry["folder"], out, copy_function=_link_or_copy)
            for f in (source / "scores").glob(f"{name}.*jsonl"):
                shutil.copyfile(f, run_dir / "scores" / f.name)
            del model
            model, _ = load_model(out / "merged")
            console.print(f"[dim]stage {name} reused from {source} (same model, settings, data and seed)[/dim]")
            results["stages"].append({**entry, "reused_from": str(source / entry["folder"])})
            results["forgetting"][name] = forgetting(base_eval, ev)
            record(name, ev)
            continue
        model, res = train_stage(model, tokenizer, st, name, out, stage_examples[i], exp.seed, console)
        console.print(
            f"stage {name}: {res.steps} steps, loss {res.first_loss:.3f} → {res.final_loss:.3f}, "
            f"{res.tokens_per_second:,.0f} tok/s{' (bf16)' if res.bf16 else ''}, {res.seconds:.0f} s"
        )
        stage_entry = {k: v for k, v in asdict(res).items() if k != "loss_history"}
        stage_entry["folder"] = str(out.relative_to(run_dir))
        results["stages"].append(stage_entry)
        ev = evaluator.evaluate(name, model)
        results["forgetting"][name] = forgetting(base_eval, ev)
        record(name, ev)
        if skey is not None and res.merged:
            base_cache[("stage", skey)] = (run_dir, stage_entry, ev)

    if probes:
        console.print(summary_table(results["summaries"], title=f"{exp.name}: probes by kind (rate [95% CI] change vs base)"))
    if results["forgetting"]:
        console.print(forgetting_table(results["perplexity"], results["forgetting"]))
    if results["style"]:
        console.print(style_table(results["style"]))
    console.print(f"results: {run_dir / 'results.json'}")
    return results


def forgetting_table(perplexity: dict, forgetting: dict, baseline: str = "base"):
    """Per model: held-out perplexity (and its ratio to the baseline) and the change of
    locality accuracy against the baseline."""
    from rich.table import Table

    table = Table(title="forgetting (held-out perplexity, locality accuracy)")
    table.add_column("model")
    base = perplexity.get(baseline, {})
    for n in base:
        table.add_column(f"ppl {n}", justify="right")
    table.add_column("locality acc. change", justify="right")
    table.add_row(baseline, *[f"{base[n]['perplexity']:.2f}" for n in base], "")
    for label, f in forgetting.items():
        ppl = perplexity.get(label, {})
        cells = [f"{ppl[n]['perplexity']:.2f} (x{ppl[n]['perplexity'] / base[n]['perplexity']:.2f})" if n in ppl else "-" for n in base]
        loc = (f.get("locality") or {}).get("delta")
        table.add_row(label, *cells, "-" if loc is None else f"{loc:+.2f}")
    return table


def style_table(style: dict):
    """Answers to the SFT training prompts, per model: overlap with the training answers,
    repetition, length and whether the answer ends with EOS (mean [95% CI])."""
    from rich.table import Table

    from factlab.report.tables import STYLE_COLUMNS, mean_cell

    table = Table(title="answers to the SFT prompts (first 50 words vs the training answers)")
    table.add_column("model")
    for _, label in STYLE_COLUMNS:
        table.add_column(label, justify="right")
    for label, st in style.items():
        table.add_row(f"{label} (n={st['n']})", *[mean_cell(st.get(k)) for k, _ in STYLE_COLUMNS])
    return table
