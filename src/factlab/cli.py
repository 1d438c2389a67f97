"""The `factlab` command (typer + rich). Thin: it parses arguments and calls the library.

Every FactlabError (bad input the user can fix) is printed as one line on stderr with exit
code 2 and no traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from factlab.errors import FactlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Teach a local LLM new facts and measure what stuck.")
# Outside a terminal (CI logs, a file) rich would wrap tables at 80 columns; give them room.
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _quiet_libraries() -> None:
    # transformers/peft chatter (GGUF conversion bars, "use_cpu" notes) drowns the table a
    # user came for; real errors still raise.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|torch)\b.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _store(path: Optional[Path], output_dir: str | Path):
    from factlab.experiment.store import RunStore

    return RunStore(path or Path(output_dir) / "factlab.db")


MlflowOpt = Annotated[bool, typer.Option("--mlflow", help="Also log each run to MLflow (needs the mlflow package).")]
StoreOpt = Annotated[Optional[Path], typer.Option("--store", help="Run store (SQLite); default: <output_dir>/factlab.db, i.e. runs/factlab.db.")]


def _load(experiment: Path, overrides: Optional[list[str]], output_dir: Optional[Path]):
    """The experiment with --set overrides and --output-dir applied (libraries quietened)."""
    _quiet_libraries()
    from factlab.config import load_experiment

    exp = load_experiment(experiment, overrides or [])
    if output_dir is not None:
        exp.output_dir = str(output_dir)
    return exp


def _presenters():
    """The runner's presentation callbacks (experiment/ never imports report/): each stage's
    loss.png as soon as it is saved, and when a run is done its tables on stderr and, with
    --mlflow, its report added to the run's MLflow run."""
    from factlab.report.console import print_run
    from factlab.report.plots import plot_stage_loss

    def on_done(folder, results, mlflow_run=None) -> None:
        print_run(err, results)
        if mlflow_run is not None:
            import tempfile

            from factlab.experiment.mlflow_log import log_artifact
            from factlab.report.build import build_report

            # The same report `factlab report RUN` writes, as one self-contained HTML file.
            with tempfile.TemporaryDirectory(prefix="factlab-mlflow-") as tmp:
                log_artifact(mlflow_run, build_report([(folder.path, folder.path.name)], Path(tmp) / "report.html"))

    return plot_stage_loss, on_done


@app.command()
def run(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: stages.0.train.lr=1e-4 (repeatable).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Folder for run folders (default: the experiment's output_dir, runs/).")] = None,
    store: StoreOpt = None,
    mlflow: MlflowOpt = False,
) -> None:
    """Run an experiment: score, train each stage, merge, score again; write a run folder."""
    from factlab.experiment.runner import run_experiment

    exp = _load(experiment, set_, output_dir)
    on_stage, on_done = _presenters()
    run_experiment(exp, console=err, store=_store(store, exp.output_dir), mlflow=mlflow, on_stage=on_stage, on_done=on_done)



@app.command()
def influence(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file with an `influence:` section.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: influence.lr=1e-3 (repeatable).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Folder for run folders (default: the experiment's output_dir, runs/).")] = None,
) -> None:
    """Empirical influence: fine-tune on each sample alone, score every sample; write the matrices,
    heatmaps and the desiderata (symmetry, sparsity, distance, noise, causality, containment).
    An experiment with `influence: {task: digits}` runs the small-CNN experiment instead."""
    from factlab.influence.digits import digits_block, run_digits_file

    if digits_block(experiment) is not None:
        if set_:
            raise FactlabError("--set is not supported for the digits task; edit influence.digits in the file")
        run_digits_file(experiment, output_dir, err)
        return
    from factlab.influence.study import run_influence

    run_influence(_load(experiment, set_, output_dir), console=err)


@app.command()
def sweep(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file with a `sweep:` block.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key before expanding (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the points and exit.")] = False,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Folder for run folders (default: the experiment's output_dir).")] = None,
    store: StoreOpt = None,
    mlflow: MlflowOpt = False,
) -> None:
    """Run every point of an experiment's sweep (grid x points x repeat); a restarted sweep
    skips finished points, and an earlier stage shared by several points is trained once."""
    from factlab.experiment.sweep import expand_sweep, run_sweep

    exp = _load(experiment, set_, output_dir)
    if not exp.sweep:
        raise FactlabError(f"{experiment} has no sweep: block; add one (dotted key: [values]) or use `factlab run`")
    points = expand_sweep(exp)
    if dry_run:
        table = Table(title=f"sweep {exp.name}: {len(points)} runs")
        table.add_column("#")
        table.add_column("folder")
        table.add_column("overrides")
        for p in points:
            table.add_row(str(p.index), p.folder, p.label)
        Console().print(table)
        return
    if mlflow:
        from factlab.experiment.mlflow_log import require_mlflow

        require_mlflow()
    on_stage, on_done = _presenters()
    run_sweep(exp, _store(store, exp.output_dir), console=err, mlflow=mlflow, on_stage=on_stage, on_done=on_done)
    Console().print(f"sweep {exp.name}: {len(points)} runs; report with: factlab report {exp.name} -o report.html")


@app.command()
def tune(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file with a `tune:` block.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key before tuning (repeatable).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Folder for run folders (default: the experiment's output_dir).")] = None,
    store: StoreOpt = None,
) -> None:
    """Search the `tune:` space with Optuna (multi-objective TPE or NSGA-II); every trial is a
    run in the store; a killed study resumes; prints the Pareto front."""
    from factlab.experiment.tune import front_table, run_tune

    exp = _load(experiment, set_, output_dir)
    on_stage, on_done = _presenters()
    study = run_tune(exp, _store(store, exp.output_dir), console=err, on_stage=on_stage, on_done=on_done)
    Console().print(front_table(study))
    Console().print(f"report with: factlab report {exp.name} -o report.html")


@app.command()
def runs(
    sweep_name: Annotated[Optional[str], typer.Option("--sweep", help="Only runs of this sweep.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Only runs of this experiment name.")] = None,
    status: Annotated[Optional[str], typer.Option("--status", help="running, done or failed.")] = None,
    store: StoreOpt = None,
) -> None:
    """List runs in the store."""
    rows = _store(store, "runs").runs(name=name, sweep=sweep_name, status=status)
    table = Table(title=f"{len(rows)} runs")
    for col in ("run folder", "sweep", "point", "status", "minutes", "tok/s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["run_dir"], r["sweep"] or "", r["label"] or "", r["status"],
                      f"{r['seconds'] / 60:.1f}" if r["seconds"] else "", f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "")
    Console().print(table)


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders to put side by side.")],
    stage: Annotated[Optional[str], typer.Option(help="Stage to compare (default: each run's last).")] = None,
) -> None:
    """Side-by-side table of runs: probe accuracy per kind (with intervals) and forgetting, then
    every run against the first on the same probes (paired differences with intervals)."""
    from factlab.report.tables import compare_table, difference_table, load_run

    runs = [load_run(d) for d in run_dirs]
    Console().print(compare_table(runs, stage=stage))
    diff = difference_table(runs, stage=stage)
    if diff is not None:
        Console().print(diff)


@app.command()
def report(
    source: Annotated[list[str], typer.Argument(help="A sweep name (from the store) or run folders.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file.")] = Path("report.html"),
    fmt: Annotated[str, typer.Option("--format", help="html (one self-contained file) or md (tables; plots as PNG files beside).")] = "html",
    probe: Annotated[Optional[list[str]], typer.Option("--probe", help="Probe id whose sampled answers to show (repeatable; default: a few).")] = None,
    store: StoreOpt = None,
) -> None:
    """Build a report from stored runs without re-running models."""
    from factlab.report.build import build_report, resolve_runs
    from factlab.report.tune import tune_sections

    st = _store(store, "runs")
    extra = [sec for src in source for sec in tune_sections(src, st)]  # a `factlab tune` study: front, trials, importances
    try:
        run_dirs = resolve_runs(source, st)
    except FactlabError:
        if not extra:
            raise
        run_dirs = []  # a study whose trials were all pruned: its own sections only
    path = build_report(run_dirs, output, fmt=fmt, probes=probe or [], extra=extra)
    err.print(f"report: {path}")


@app.command("eval")
def eval_(
    model_or_run: Annotated[str, typer.Argument(help="Model alias, model folder, hub id (online only), or a run folder (scores base + every stage).")],
    probes: Annotated[Optional[list[Path]], typer.Option("--probes", "-p", help="Probe JSONL file (repeatable; default for a run folder: its own probes).")] = None,
    general_text: Annotated[Optional[list[Path]], typer.Option("--general-text", help="Held-out text file for perplexity (repeatable).")] = None,
    in_context: Annotated[Optional[list[Path]], typer.Option("--in-context", help="Documents to put in the prompt for an in-context baseline on the first model (repeatable).")] = None,
    samples: Annotated[int, typer.Option(help="Sampled continuations per probe (0: none).")] = 5,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.9,
    batch_size: Annotated[int, typer.Option(help="Scoring batch size.")] = 16,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the summaries as JSON here.")] = None,
) -> None:
    """Evaluate a model, or every stage of a run, on probes without training."""
    _quiet_libraries()
    import json

    from factlab.config import EvalSpec
    from factlab.data.corpus import load_documents
    from factlab.experiment.evaluation import eval_targets, evaluate_models
    from factlab.experiment.run_folder import RunFolder
    from factlab.report.console import forgetting_table, summary_table

    if not probes and RunFolder(model_or_run).config_path.is_file():
        probes = [Path(p) for p in (RunFolder(model_or_run).read_config().get("eval", {}) or {}).get("probes", [])]
    if not probes:
        raise FactlabError("no probes to score; give --probes FILE (JSONL, one probe per line)")
    from pydantic import ValidationError

    try:
        spec = EvalSpec(probes=[str(p) for p in probes], general_text=[str(p) for p in general_text or []],
                        batch_size=batch_size, sampling={"n": samples, "temperature": temperature})
    except ValidationError as e:
        raise FactlabError(f"bad option: {e.errors()[0]['loc'][-1]}: {e.errors()[0]['msg']}") from None
    context = "\n\n".join(load_documents(in_context)) if in_context else None
    results = evaluate_models(eval_targets(model_or_run, err), spec, context=context, seed=seed, console=err)
    first = next(iter(results["summaries"]), None)
    out = Console()
    if first is not None:
        out.print(summary_table(results["summaries"], title=f"probes by kind (rate [95% CI] change vs {first})", baseline=first))
    first_ppl = next(iter(results["perplexity"]), None)
    if first_ppl is not None and results["perplexity"][first_ppl]:
        out.print(forgetting_table(results["perplexity"], results["forgetting"], baseline=first_ppl))
    if output:
        output.write_text(json.dumps(results, indent=2))
        err.print(f"summaries: {output}")


@app.command()
def models() -> None:
    """List model aliases (usable as `model:` in an experiment)."""
    from factlab.models.loading import cache_root, describe_aliases

    table = Table(title=f"model aliases (cache: {cache_root()})")
    for col in ("alias", "status", "model"):
        table.add_column(col)
    for row in describe_aliases():
        table.add_row(*row)
    Console().print(table)
    Console().print("Also accepted: a local Hugging Face folder, or a hub id (only when online).")


@app.command()
def export(
    model_or_run: Annotated[str, typer.Argument(help="A run folder (exports its last stage, or --stage), a model folder or an alias.")],
    gguf: Annotated[Path, typer.Option("--gguf", help="Output .gguf file.")],
    stage: Annotated[Optional[str], typer.Option("--stage", help="Stage to export (default: the last).")] = None,
    type_: Annotated[str, typer.Option("--type", help="f16 (half precision) or q8_0 (8-bit blocks).")] = "f16",
    verify: Annotated[bool, typer.Option("--verify", help="Read the file back with transformers and compare log-probs on the run's probes.")] = False,
    probes: Annotated[Optional[list[Path]], typer.Option("--probes", "-p", help="Probe JSONL for --verify (default for a run folder: its own).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
) -> None:
    """Write a stage's merged model and tokenizer as one GGUF file (llama.cpp, Ollama, LM Studio)."""
    _quiet_libraries()
    from factlab.chat import pick_target
    from factlab.models.gguf_export import GGUF_TYPES, export_gguf

    if type_ not in GGUF_TYPES:
        raise FactlabError(f"--type must be one of {', '.join(GGUF_TYPES)}, got '{type_}'")
    if gguf.suffix.lower() != ".gguf":
        raise FactlabError(f"--gguf {gguf}: give a file name ending in .gguf")
    if gguf.exists() and not force:
        raise FactlabError(f"{gguf} exists; choose another path or pass --force to overwrite")
    target = pick_target(model_or_run, stage, err)
    if len(target) > 2:
        raise FactlabError(f"stage '{target[0]}' was not merged (its result is an adapter); GGUF export needs a merged/ model: "
                           "run the stage with merge: true and a mergeable method")
    path = export_gguf(Path(target[1]), gguf, type_, console=err)
    err.print(f"exported {target[0]} ({target[1]}) to {path} ({path.stat().st_size / 1e6:.1f} MB, {type_})")
    if verify:
        import yaml

        from factlab.experiment.evaluation import load_probe_files
        from factlab.models.gguf_export import verify_gguf

        run_cfg = Path(model_or_run) / "config.yaml"
        if not probes and run_cfg.is_file():
            probes = [Path(p) for p in (yaml.safe_load(run_cfg.read_text()).get("eval", {}) or {}).get("probes", [])]
        if not probes:
            raise FactlabError("--verify needs probes; give --probes FILE (JSONL)")
        v = verify_gguf(Path(target[1]), path, load_probe_files([str(p) for p in probes]))
        Console(soft_wrap=True).print(f"round trip through transformers on {v['probes']} probes: next-token log-prob max |diff| "
                        f"{v['next_token_max_abs']:.2e}, candidate log-prob/token max |diff| {v['candidate_max_abs']:.2e}, "
                        f"candidate verdict same on {v['correct_same']}/{v['probes']} (correct {v['correct_before']} -> {v['correct_after']}), "
                        f"greedy continuation same on {v['greedy_same']}/{v['probes']}")


@app.command()
def chat(
    model_or_run: Annotated[str, typer.Argument(help="A run folder (its last stage, or --stage), a model alias, .gguf file or folder.")],
    stage: Annotated[Optional[str], typer.Option("--stage", help="Stage to talk to (default: the last; 'base' for the untrained model).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature (0: greedy).")] = 0.7,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")] = 200,
    compare: Annotated[bool, typer.Option("--compare", help="Answer each question with the base model too, before the tuned one.")] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Talk to a model in the terminal (chat template, streamed answers, /reset, /quit)."""
    _quiet_libraries()
    from factlab.chat import chat_loop, load_chat_models

    if temperature < 0 or max_new_tokens < 1:  # before loading any model
        raise FactlabError(f"--temperature must be >= 0 and --max-new-tokens >= 1, got {temperature} and {max_new_tokens}")
    models = load_chat_models(model_or_run, stage, compare, console=err)
    chat_loop(models, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)


def _register_subcommands() -> None:
    from factlab.cli_data import data_app

    app.add_typer(data_app, name="data")


_register_subcommands()


def main() -> None:
    try:
        # standalone_mode=False returns (not raises) a typer.Exit's code: pass it on.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except FactlabError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # click usage errors carry their own exit code
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
