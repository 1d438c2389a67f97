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

from factlab.errors import FactlabError, interrupt_kept, on_interrupt

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Teach a local LLM new facts and measure what stuck.")
# Outside a terminal (CI logs, a file) rich would wrap tables at 80 columns; give them room.
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _no_bool_metavar() -> None:
    """typer 0.29's rich help shows `<bool>` after plain flags (`--dry-run <bool>`), which
    reads as if the flag took a value; show nothing there, as click does."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_no_bool_metavar()


def _version(value: bool) -> None:
    if value:
        from factlab import __version__

        Console().print(f"factlab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Teach a local LLM new facts and measure what stuck."""


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


def _store(path: Optional[Path], output_dir: str | Path, must_exist: bool = False):
    from factlab.experiment.store import RunStore

    _check_store(path or Path(output_dir) / "factlab.db", "--store" if path else "the run store", must_exist)
    return RunStore(path or Path(output_dir) / "factlab.db")


# --- checks at the top of commands: bad paths fail before any model is loaded or file written


def _check_store(path: Path, flag: str, must_exist: bool = False) -> None:
    """A run store path must be a SQLite file (or not exist yet, unless `must_exist`)."""
    if path.is_dir():
        raise FactlabError(f"{flag} {path} is a folder; give the run store's file, e.g. {path / 'factlab.db'}")
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\0":
            raise FactlabError(f"{flag} {path} is not a factlab run store (not a SQLite database); give factlab.db "
                               "or a new path")
    elif must_exist:
        raise FactlabError(f"{flag} {path} does not exist; give the factlab.db under your runs folder")
    elif path.parent.exists() and not path.parent.is_dir():
        raise FactlabError(f"{flag} {path}: {path.parent} is a file, not a folder; give another path")


def _check_out_dir(path: Path, flag: str) -> None:
    """An output folder must be a folder or not exist yet (nor sit under a file)."""
    if path.exists() and not path.is_dir():
        raise FactlabError(f"{flag} {path} is a file; give a folder for the output")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FactlabError(f"{flag} {path}: {parent} is a file, not a folder; give another path")
            break


def _check_out_file(path: Path, flag: str, example: str = "report.html") -> None:
    """An output file must not be a folder (nor sit under a file)."""
    if path.is_dir():
        raise FactlabError(f"{flag} {path} is a folder; give a file name, e.g. {path / example}")
    _check_out_dir(path.parent, flag)


def _check_seed(seed: int) -> None:
    """--seed within what torch's and numpy's generators take (as the experiment's seed:)."""
    if not 0 <= seed <= 2**32 - 1:
        raise FactlabError(f"--seed {seed} is out of range; give a number from 0 to {2**32 - 1}")


def _check_run_folders(folders) -> None:
    """Each folder is a finished run (a training or an influence run) whose results read
    (RunFolder names the problem in one line)."""
    from factlab.experiment.run_folder import RunFolder

    for folder in map(Path, folders):
        if not folder.exists():
            raise FactlabError(f"run folder {folder} does not exist; check the path (see `factlab runs`)")
        RunFolder(folder).read_record()


def _note_new_folders(root: Path):
    """For Ctrl-C: what a run/sweep kept under `root` (run folders keep their finished stages)."""
    before = set(root.iterdir()) if root.is_dir() else set()

    def note() -> str | None:
        new = sorted(set(root.iterdir()) - before) if root.is_dir() else []
        if not new:
            return "nothing was written"
        return f"kept {', '.join(map(str, new))} (finished stages are complete; the interrupted one was discarded)"

    return note


DeviceOpt = Annotated[str, typer.Option("--device", help="auto (a GPU when torch sees one), cpu, cuda or mps.")]
RuntimeOpt = Annotated[str, typer.Option("--runtime", help="transformers (default), or llama.cpp: run a .gguf file in llama.cpp itself (xllamacpp).")]


def _one_process(command: str) -> None:
    """Only `factlab run` runs data-parallel under accelerate launch / torchrun; any other
    command there would run N times over, racing on the same files."""
    from factlab.models.device import world_size

    if world_size() > 1:
        hint = "; run sweep points in parallel with `factlab sweep --workers N`" if command == "sweep" else ""
        raise FactlabError(f"`factlab {command}` runs in one process; launch only `factlab run` with several "
                           f"processes (accelerate launch / torchrun){hint}")


MlflowOpt = Annotated[bool, typer.Option("--mlflow", help="Also log each run to MLflow (needs the mlflow package).")]
StoreOpt = Annotated[Optional[Path], typer.Option("--store", help="Run store (SQLite); default: <output_dir>/factlab.db, i.e. runs/factlab.db.")]
StorageOpt = Annotated[Optional[str], typer.Option(
    "--storage", help="Optuna study storage shared by several workers: a database URL (postgresql://user:pw@host/db, "
                      "mysql://..., sqlite:///study.db); default: a SQLite file beside the run store, one process at a time.")]
ReadStoreOpt = Annotated[Optional[Path], typer.Option("--store", help="Run store (SQLite) to read; default: runs/factlab.db.")]
RUN_STATUSES = ("running", "done", "failed")


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
        print_run(err, results, targets=(folder.read_config().get("eval") or {}).get("targets"))
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
    from factlab.experiment.events import RunEvents
    from factlab.experiment.runner import RunOptions, run_experiment

    if output_dir is not None:
        _check_out_dir(output_dir, "--output-dir")
    exp = _load(experiment, set_, output_dir)
    _check_out_dir(Path(exp.output_dir), "output_dir")
    run_store = _store(store, exp.output_dir)
    on_interrupt(_note_new_folders(Path(exp.output_dir)))
    on_stage, on_done = _presenters()
    from factlab.train import distributed

    try:
        run_experiment(exp, RunOptions(store=run_store, mlflow=mlflow), RunEvents(err, on_stage, on_done))
    finally:
        distributed.stop()



@app.command()
def influence(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file with an `influence:` section.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: influence.lr=1e-3 (repeatable).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Folder for run folders (default: the experiment's output_dir, runs/).")] = None,
    store: StoreOpt = None,
) -> None:
    """Empirical influence: fine-tune on each sample alone, score every sample; write the matrices,
    heatmaps and the desiderata (symmetry, sparsity, distance, noise, causality, containment).
    An experiment with `influence: {task: digits}` runs the small-CNN experiment instead."""
    from factlab.influence.digits import digits_block, run_digits_file

    _one_process("influence")
    if output_dir is not None:
        _check_out_dir(output_dir, "--output-dir")
    if digits_block(experiment) is not None:
        if set_:
            raise FactlabError("--set is not supported for the digits task; edit influence.digits in the file")
        on_interrupt(lambda: "nothing was kept (the digits result is written only when complete)")
        run_digits_file(experiment, None, err, parent=output_dir)
        return
    from factlab.influence.study import run_influence

    from factlab.report.influence import desiderata_table

    exp = _load(experiment, set_, output_dir)
    _check_out_dir(Path(exp.output_dir), "output_dir")
    run_store = _store(store, exp.output_dir)

    def on_done(folder, results) -> None:
        Console().print(desiderata_table(results))
        t = results.timing
        err.print(f"fine-tuning: {t.finetune_seconds_per_row:.2f} s per row, {t.finetune_seconds:.1f} s for the "
                  f"{results.n_rows}x{results.n_columns} matrix"
                  + (f"; in-context: {t.in_context_seconds:.1f} s" if t.in_context_seconds is not None else ""))

    on_interrupt(lambda: "nothing was kept (an influence run folder appears only when complete)")
    run_influence(exp, console=err, store=run_store, on_done=on_done)


@app.command()
def sweep(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file with a `sweep:` block.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key before expanding (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the points and exit.")] = False,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Folder for run folders (default: the experiment's output_dir).")] = None,
    store: StoreOpt = None,
    mlflow: MlflowOpt = False,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Run points in this many processes, each with its share of the CPU threads (at most one per CPU).")] = 1,
) -> None:
    """Run every point of an experiment's sweep (grid x points x repeat); a restarted sweep
    skips finished points, and an earlier stage shared by several points is trained once
    (once per worker with --workers)."""
    from factlab.experiment.preflight import preflight_sweep
    from factlab.experiment.events import SweepEvents
    from factlab.experiment.sweep import SweepOptions, expand_sweep, run_sweep

    _one_process("sweep")
    if workers < 1:
        raise FactlabError(f"--workers {workers} is out of range; give 1 or more processes")
    if output_dir is not None:
        _check_out_dir(output_dir, "--output-dir")
    exp = _load(experiment, set_, output_dir)
    if not exp.sweep:
        raise FactlabError(f"{experiment} has no sweep: block; add one (dotted key: [values]) or use `factlab run`")
    _check_out_dir(Path(exp.output_dir), "output_dir")
    sweep_store = _store(store, exp.output_dir)
    points = expand_sweep(exp)
    if mlflow:  # before --dry-run returns: the dry run refuses what the run would
        from factlab.experiment.mlflow_log import require_mlflow

        require_mlflow()
    if dry_run:
        preflight_sweep(points, err)  # the device, every point's files, layer groups and ranges (run_sweep does it too)
        table = Table(title=f"sweep {exp.name}: {len(points)} runs")
        table.add_column("#")
        table.add_column("folder")
        table.add_column("overrides")
        for p in points:
            table.add_row(str(p.index), p.folder, p.label)
        Console().print(table)
        return
    on_interrupt(_note_new_folders(Path(exp.output_dir) / exp.name))
    on_stage, on_done = _presenters()
    run_sweep(exp, sweep_store, SweepOptions(workers=workers, mlflow=mlflow), SweepEvents(err, on_stage, on_done))
    Console().print(f"sweep {exp.name}: {len(points)} runs; report with: factlab report {exp.name} -o report.html")


@app.command()
def tune(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML file with a `tune:` block.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key before tuning (repeatable).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Folder for run folders (default: the experiment's output_dir).")] = None,
    store: StoreOpt = None,
    storage: StorageOpt = None,
    study_name: Annotated[Optional[str], typer.Option("--study-name", help="Name of the study (default: the experiment's name); also its run folders' parent folder.")] = None,
    heartbeat: Annotated[int, typer.Option("--heartbeat", min=1, help="With --storage: seconds between a trial's heartbeats; a trial silent for two is failed and retried.")] = 60,
) -> None:
    """Search the `tune:` space with Optuna (multi-objective TPE or NSGA-II); every trial is a
    run in the store; a killed study resumes; prints the Pareto front. With --storage, start
    it on several machines (or once per GPU) to share one study."""
    from factlab.experiment.events import TuneEvents
    from factlab.experiment.tune import check_storage_url, front_table, run_tune

    _one_process("tune")
    if output_dir is not None:
        _check_out_dir(output_dir, "--output-dir")
    if storage is not None:
        check_storage_url(storage)
    if study_name is not None and (not study_name.strip() or "/" in study_name or study_name != study_name.strip()):
        raise FactlabError(f"--study-name {study_name!r}: give a name without slashes or surrounding spaces (it names a folder)")
    exp = _load(experiment, set_, output_dir)
    _check_out_dir(Path(exp.output_dir), "output_dir")
    name = study_name or exp.name
    again = f"factlab tune {experiment}" + (" --storage URL" if storage else "") + (f" --study-name {name}" if study_name else "")
    on_interrupt(lambda: f"finished trials are kept in the study's storage and an interrupted trial is queued again; "
                         f"run `{again}` again to resume")
    on_stage, on_done = _presenters()
    from factlab.experiment.tune import storage_label, storage_path
    from factlab.experiment.tune_guard import optuna_errors

    run_store = _store(store, exp.output_dir)
    where = f"study {name} in " + (storage_label(storage) if storage else str(storage_path(run_store, name)))
    with optuna_errors(where):  # Optuna's and SQLAlchemy's exceptions: one line
        study = run_tune(exp, run_store, TuneEvents(err, on_stage, on_done),
                         storage=storage, study_name=study_name, heartbeat=heartbeat)
        Console().print(front_table(study))
    Console().print(f"report with: factlab report {name} -o report.html" + (" --storage URL" if storage else ""))


@app.command()
def runs(
    sweep_name: Annotated[Optional[str], typer.Option("--sweep", help="Only runs of this sweep.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Only runs of this experiment name.")] = None,
    status: Annotated[Optional[str], typer.Option("--status", help="running, done or failed.")] = None,
    store: ReadStoreOpt = None,
) -> None:
    """List runs in the store."""
    if status is not None and status not in RUN_STATUSES:
        raise FactlabError(f"--status {status!r} is not a run status; use one of {', '.join(RUN_STATUSES)}")
    rows = _store(store, "runs", must_exist=store is not None).runs(name=name, sweep=sweep_name, status=status)
    table = Table(title=f"{len(rows)} runs")
    for col in ("run folder", "kind", "sweep", "point", "status", "minutes", "tok/s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["run_dir"], r["kind"], r["sweep"] or "", r["label"] or "", r["status"],
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

    _check_run_folders(run_dirs)
    runs = [load_run(d) for d in run_dirs]
    if stage is not None:
        for r in runs:
            if stage not in r.results.summaries:
                raise FactlabError(f"--stage {stage!r}: run {r.folder} has no such stage; its stages are "
                                   f"{', '.join(r.results.summaries) or '(none)'}")
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
    store: ReadStoreOpt = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="The database URL a `factlab tune --storage` study ran with: its front and trials are read from there.")] = None,
) -> None:
    """Build a report from stored runs without re-running models."""
    from factlab.report.build import build_report, resolve_runs
    from factlab.report.tune import tune_sections

    if fmt not in ("html", "md"):
        raise FactlabError(f"--format {fmt!r} is not a report format; use html or md")
    _check_out_file(output, "--output")
    st = _store(store, "runs", must_exist=store is not None)
    if storage is not None:
        from factlab.experiment.tune import check_storage_url

        check_storage_url(storage)
    extra = [sec for src in source for sec in tune_sections(src, st, storage)]  # a `factlab tune` study: front, trials, importances
    try:
        run_dirs = resolve_runs(source, st)
    except FactlabError:
        if not extra:
            raise
        run_dirs = []  # a study whose trials were all pruned: its own sections only
    _check_run_folders([d for d, _ in run_dirs])
    if probe:
        from factlab.report.tables import load_run

        from factlab.report.influence import is_influence_run

        runs = [load_run(d) for d, _ in run_dirs if not is_influence_run(d)]
        known = {row.get("id") for r in runs for st_ in ["base", *r.stages] for row in r.rows(st_)}
        unknown = [p for p in probe if p not in known]
        if unknown:
            raise FactlabError(f"--probe {unknown[0]!r} is not a probe id of these runs; see the ids in their "
                               "scores/*.jsonl (e.g. the probe files' \"id\" fields)")
    import shutil

    from factlab.atomic import staged_dir

    # Built in a temporary sibling folder and moved into place when complete (the report, and
    # for md its figures folder): Ctrl-C or an error never leaves half a report.
    with staged_dir(output.parent / f".{output.name}.build") as tmp:
        build_report(run_dirs, tmp / output.name, fmt=fmt, probes=probe or [], extra=extra)
        for entry in sorted(tmp.iterdir(), key=lambda e: e.name == output.name):  # the report itself last
            if (output.parent / entry.name).is_dir():
                shutil.rmtree(output.parent / entry.name)
            os.replace(entry, output.parent / entry.name)
    shutil.rmtree(output.parent / f".{output.name}.build", ignore_errors=True)
    path = output
    err.print(f"report: {path}", markup=False)


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
    device: DeviceOpt = "auto",
    runtime: RuntimeOpt = "transformers",
) -> None:
    """Evaluate a model, or every stage of a run, on probes without training."""
    _quiet_libraries()
    _one_process("eval")
    import json

    from factlab.models.llama_cpp_lm import check_gguf_target, check_runtime

    if check_runtime(runtime) == "llama.cpp":
        check_gguf_target(Path(model_or_run))

    from factlab.config import EvalSpec
    from factlab.data.corpus import load_documents
    from factlab.experiment.evaluation import eval_targets, evaluate_models
    from factlab.experiment.run_folder import RunFolder
    from factlab.report.console import forgetting_table, summary_table

    # Options and paths first: nothing is loaded or scored before they are all right.
    for flag, value, ok, rule in (("--samples", samples, samples >= 0, "0 or more"),
                                  ("--temperature", temperature, 0 < temperature < float("inf"), "above 0"),
                                  ("--batch-size", batch_size, batch_size > 0, "1 or more")):
        if not ok:
            raise FactlabError(f"{flag} {value} is out of range; give a number {rule}")
    _check_seed(seed)
    if output is not None:
        _check_out_file(output, "--output")
    from factlab.models.device import resolve_device

    torch_device = resolve_device(device)
    run = RunFolder(model_or_run)
    if not probes and run.config_path.is_file():
        cfg = run.read_config()
        if isinstance(cfg, dict) and isinstance(cfg.get("eval"), dict):
            probes = [Path(p) for p in cfg["eval"].get("probes") or []]
    if not probes:
        raise FactlabError("no probes to score; give --probes FILE (JSONL, one probe per line)")
    from factlab.experiment.evaluation import load_probe_files

    probe_list = load_probe_files([str(p) for p in probes])
    for flag, files in (("--general-text", general_text), ("--in-context", in_context)):
        for f in files or []:
            if not f.is_file():
                raise FactlabError(f"{flag} {f} {'is a folder' if f.is_dir() else 'does not exist'}; give a text file")
    from pydantic import ValidationError

    try:
        spec = EvalSpec(probes=[str(p) for p in probes], general_text=[str(p) for p in general_text or []],
                        batch_size=batch_size, sampling={"n": samples, "temperature": temperature})
    except ValidationError as e:
        flags = {"n": "--samples", "temperature": "--temperature", "batch_size": "--batch-size"}
        loc = str(e.errors()[0]["loc"][-1])
        raise FactlabError(f"bad option {flags.get(loc, loc)}: {e.errors()[0]['msg']}") from None
    context = "\n\n".join(load_documents(in_context)) if in_context else None
    targets = eval_targets(model_or_run, err, runtime)
    if runtime == "transformers":  # llama.cpp refuses a request longer than its context itself, in one line
        from factlab.experiment.preflight import ModelShape, check_probe_lengths

        _, tokenizer, shape = ModelShape(err).get(str(targets[0][1]))
        check_probe_lengths(probe_list, tokenizer, shape)
    if output is not None:
        on_interrupt(lambda: "nothing was written (the scores were not saved)")
    results = evaluate_models(targets, spec, context=context, seed=seed, console=err, device=torch_device, runtime=runtime)
    first = next(iter(results["summaries"]), None)
    out = Console()
    if first is not None:
        out.print(summary_table(results["summaries"], title=f"probes by kind (rate [95% CI] change vs {first})", baseline=first))
    first_ppl = next(iter(results["perplexity"]), None)
    if first_ppl is not None and results["perplexity"][first_ppl]:
        out.print(forgetting_table(results["perplexity"], results["forgetting"], baseline=first_ppl))
    if output:
        from factlab.atomic import write_text_atomic

        write_text_atomic(output, json.dumps(results, indent=2))
        err.print(f"summaries: {output}", markup=False)


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
    gguf: Annotated[Optional[Path], typer.Option("--gguf", help="Output .gguf file.")] = None,
    survival: Annotated[Optional[Path], typer.Option("--survival", help="Output folder: export f16, q8_0 and q4_0 files there, score each in llama.cpp (and the fp32 model in transformers) on the run's probes, write survival.json and survival.md (which facts survive quantization).")] = None,
    ollama: Annotated[Optional[Path], typer.Option("--ollama", help="Output folder for Ollama: model.gguf and a Modelfile (chat template, stop tokens, parameters) for `ollama create NAME -f DIR/Modelfile`.")] = None,
    stage: Annotated[Optional[str], typer.Option("--stage", help="Stage to export (default: the last).")] = None,
    type_: Annotated[str, typer.Option("--type", help="f16 (half precision), q8_0 (8-bit blocks) or q4_0 (4-bit blocks; the logits' matrix 8-bit).")] = "f16",
    verify: Annotated[bool, typer.Option("--verify", help="Load the file in llama.cpp (xllamacpp) and compare it with the transformers model on the run's probes: tokens, greedy answers, every candidate token's log-prob and every verdict (f16: within 0.02, all kept, else exit 1; quantized: the share kept).")] = False,
    probes: Annotated[Optional[list[Path]], typer.Option("--probes", "-p", help="Probe JSONL for --verify (default for a run folder: its own).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
) -> None:
    """Write a stage's merged model and tokenizer as one GGUF file (llama.cpp, Ollama, LM Studio)."""
    _quiet_libraries()
    from factlab.chat import pick_target
    from factlab.models.gguf_export import GGUF_TYPES, export_gguf

    if type_ not in GGUF_TYPES:
        raise FactlabError(f"--type must be one of {', '.join(GGUF_TYPES)}, got '{type_}'")
    if sum(x is not None for x in (gguf, ollama, survival)) != 1:
        raise FactlabError("give one output: --gguf FILE.gguf, --ollama DIR or --survival DIR")
    if survival is not None:
        _export_survival(model_or_run, stage, survival, probes, force)
        return
    if ollama is not None:
        from factlab.models.ollama import export_ollama

        _check_out_dir(ollama, "--ollama")
        if (ollama / "Modelfile").exists() and not force:
            raise FactlabError(f"{ollama / 'Modelfile'} exists; choose another folder or pass --force to overwrite")
        target = pick_target(model_or_run, stage, err)
        if len(target) > 2:
            raise FactlabError(f"stage '{target[0]}' was not merged (its result is an adapter); export needs a merged/ model")
        mf = export_ollama(Path(target[1]), ollama, type_, console=err)
        err.print(f"exported {target[0]} to {mf.parent} (model.gguf, {type_}, and Modelfile); then: ollama create NAME -f {mf}",
                  markup=False)
        if not verify:
            return
        gguf = ollama / "model.gguf"
    elif gguf.suffix.lower() != ".gguf":
        raise FactlabError(f"--gguf {gguf}: give a file name ending in .gguf")
    if ollama is None:
        _check_out_file(gguf, "--gguf", "model.gguf")  # a folder named x.gguf: --force would not help
        if gguf.exists() and not force:
            raise FactlabError(f"--gguf {gguf} exists; choose another path or pass --force to overwrite")
        before = gguf.stat().st_mtime_ns if gguf.exists() else None
        on_interrupt(lambda: f"{gguf} was written completely" if gguf.exists() and gguf.stat().st_mtime_ns != before
                     else "nothing was written" + (f" ({gguf} is as it was)" if before is not None else ""))
        target = pick_target(model_or_run, stage, err)
        if len(target) > 2:
            raise FactlabError(f"stage '{target[0]}' was not merged (its result is an adapter); GGUF export needs a merged/ model: "
                               "run the stage with merge: true and a mergeable method")
        path = export_gguf(Path(target[1]), gguf, type_, console=err)
        err.print(f"exported {target[0]} ({target[1]}) to {path} ({path.stat().st_size / 1e6:.1f} MB, {type_})")
    else:
        path = gguf
    if verify:
        from factlab.experiment.evaluation import load_probe_files
        from factlab.experiment.run_folder import RunFolder
        from factlab.models.gguf_export import F16_LOGPROB_TOL, verify_in_llama_cpp

        run = RunFolder(model_or_run)
        if not probes and run.config_path.is_file():
            probes = [Path(p) for p in (run.read_config().get("eval", {}) or {}).get("probes", [])]
        if not probes:
            raise FactlabError("--verify needs probes; give --probes FILE (JSONL)")
        probe_list = load_probe_files([str(p) for p in probes])
        c = verify_in_llama_cpp(Path(target[1]), path, probe_list)
        say = Console(soft_wrap=True).print
        say(f"llama.cpp loads {path.name}: tokenization same as transformers on {c['tokens_same']}/{c['prompts']} probes, "
            f"greedy continuation ({c['n_tokens']} tokens) same on {c['greedy_same']}/{c['prompts']} (first token on {c['first_token_same']}/{c['prompts']})")
        for prompt, a, b in c["examples"]:
            say(f"  {prompt!r}: transformers {a!r}, llama.cpp {b!r}", markup=False)
        say(f"scored in llama.cpp against the transformers model on {c['probes']} probes: candidate token log-prob max |diff| "
            f"{c['token_max_abs']:.2e} over {c['tokens_scored']} tokens, candidate verdict same on {c['correct_same']}/{c['probes']} "
            f"(correct {c['correct_before']} -> {c['correct_after']}), greedy-answer match same on {c['greedy_match_same']}/{c['probes']}")
        if type_ == "f16":
            ok = c["token_max_abs"] <= F16_LOGPROB_TOL and c["correct_same"] == c["probes"]
            say(f"f16 check (log-probs within {F16_LOGPROB_TOL} per token, every verdict kept): {'passed' if ok else 'FAILED'}")
            if not ok:
                raise typer.Exit(1)
        else:
            say(f"{type_}: {c['correct_same']}/{c['probes']} verdicts kept ({100 * c['correct_same'] / c['probes']:.0f}%)")


def _export_survival(model_or_run: str, stage: Optional[str], out: Path, probes: Optional[list[Path]], force: bool) -> None:
    """`factlab export --survival DIR` (experiment.survival)."""
    from factlab.chat import pick_target
    from factlab.config import EvalSpec
    from factlab.experiment.evaluation import load_probe_files
    from factlab.experiment.run_folder import RunFolder
    from factlab.experiment.survival import quantization_survival

    _check_out_dir(out, "--survival")
    if (out / "survival.json").exists() and not force:
        raise FactlabError(f"{out / 'survival.json'} exists; choose another folder or pass --force to overwrite")
    cfg_eval = RunFolder(model_or_run).read_config().get("eval") or {}
    probes = probes or [Path(p) for p in cfg_eval.get("probes") or []]
    if not probes:
        raise FactlabError("--survival needs probes; give --probes FILE (JSONL)")
    load_probe_files([str(p) for p in probes])  # bad probe files fail before anything is exported
    target = pick_target(model_or_run, stage, err)
    if len(target) > 2:
        raise FactlabError(f"stage '{target[0]}' was not merged (its result is an adapter); export needs a merged/ model")
    # The run's own held-out texts; no samples (a fresh llama.cpp draw is not the question here), no
    # priming prompts (not in the table).
    spec = EvalSpec(probes=[str(p) for p in probes], general_text=cfg_eval.get("general_text") or [],
                    builtin_general_text=cfg_eval.get("builtin_general_text", True), sampling={"n": 0}, priming=False)
    rows = quantization_survival(Path(target[1]), out, spec, console=err)
    from factlab.experiment.survival import markdown_table

    Console(soft_wrap=True).print(markdown_table([{k: v for k, v in r.items() if k != "MB"} for r in rows]), markup=False)
    err.print(f"survival table: {out / 'survival.md'} (and survival.json)", markup=False)


@app.command()
def chat(
    model_or_run: Annotated[str, typer.Argument(help="A run folder (its last stage, or --stage), a model alias, .gguf file or folder.")],
    stage: Annotated[Optional[str], typer.Option("--stage", help="Stage to talk to (default: the last; 'base' for the untrained model).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature (0: greedy).")] = 0.7,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")] = 200,
    compare: Annotated[bool, typer.Option("--compare", help="Answer each question with the base model too, before the tuned one.")] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    device: DeviceOpt = "auto",
    runtime: RuntimeOpt = "transformers",
) -> None:
    """Talk to a model in the terminal (chat template, streamed answers, /reset, /quit)."""
    _quiet_libraries()
    _one_process("chat")
    from factlab.chat import chat_loop, load_chat_models
    from factlab.models.device import resolve_device
    from factlab.models.llama_cpp_lm import check_gguf_target, check_runtime

    # Before loading any model. `not >= 0` also refuses nan, which compares false to everything
    # (and so answered greedily); inf would sample uniformly from the whole vocabulary.
    if not (0 <= temperature < float("inf")):
        raise FactlabError(f"--temperature {temperature} is out of range; give a number from 0 (greedy) up, e.g. 0.7")
    if max_new_tokens < 1:
        raise FactlabError(f"--max-new-tokens {max_new_tokens} is out of range; give 1 or more tokens")
    _check_seed(seed)
    if check_runtime(runtime) == "llama.cpp":
        check_gguf_target(Path(model_or_run))
    models = load_chat_models(model_or_run, stage, compare, console=err, device=resolve_device(device), runtime=runtime)
    chat_loop(models, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)


def _register_subcommands() -> None:
    from factlab.cli_data import data_app

    app.add_typer(data_app, name="data")


_register_subcommands()


def _say(message: str) -> None:
    """One plain line on stderr: never parsed as rich markup (`exp[v2].yaml` stays intact), and
    any newline inside the message folded so that a message is always exactly one line."""
    from rich.text import Text

    line = " ".join(str(message).split())
    text = Text("error: ", style="red") + Text(line) if not line.startswith("interrupted") else Text(line)
    Console(stderr=True, soft_wrap=True, highlight=False).print(text)


def _interrupted() -> None:
    kept = interrupt_kept()
    _say(f"interrupted; {kept}" if kept else "interrupted; nothing was written")
    sys.exit(130)


def main() -> None:
    """The `factlab` entry point: usage errors and FactlabError -> one line, exit 2; Ctrl-C ->
    one line, exit 130; the app runs in standalone_mode=False so that click/typer hand every
    error to us instead of printing a rich panel (or a traceback) themselves."""
    # typer 0.29 vendors click as typer._click: its usage errors derive from TyperException, not
    # from the click package's ClickException, so catch both families.
    from typer.exceptions import TyperException

    usage_errors: tuple = (TyperException,)
    try:
        import click

        usage_errors += (click.exceptions.ClickException,)
    except ImportError:  # pragma: no cover - click is a typer dependency in older releases only
        pass
    from factlab.atomic import catch_interrupts, interrupt_pending

    restore = catch_interrupts()  # a Ctrl-C a finalizer swallows still stops the command
    try:
        # standalone_mode=False returns (not raises) a typer.Exit's code: pass it on. typer
        # turns a Ctrl-C inside a command into Exit(130).
        code = app(standalone_mode=False, prog_name="factlab")
        if code == 130 or interrupt_pending():
            _interrupted()
        if isinstance(code, int) and code:
            sys.exit(code)
    except FactlabError as e:
        _say(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except OSError as e:
        # A path the system refuses (permissions, a full disk, a name too long): the user's to
        # fix, so one line naming it rather than a traceback.
        what = f"{e.filename}: " if e.filename else ""
        _say(f"{what}{e.strerror or e}; check the path and its permissions")
        sys.exit(2)
    except typer.Abort:
        _interrupted()
    except usage_errors as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `factlab` or `factlab data` alone: help was shown
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        message = e.format_message().replace(" (Possible options: --help)", "").rstrip(".")
        _say(f"{message}{where}")
        sys.exit(getattr(e, "exit_code", 2) or 2)
    finally:
        restore()

