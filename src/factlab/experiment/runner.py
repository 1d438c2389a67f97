"""Run an experiment: load the model, score the probes, then for every stage train → merge →
save → score again, and record everything in the run folder (experiment/run_folder.py owns
its layout and records).

Everything that can be checked without training (data files, probes, layer groups, chat
template) is checked before the first write, so bad input never leaves a half-made run.
Presentation is the caller's: the runner reports each step to a RunEvents
(experiment.events: a line each on its console by default; the CLI adds tables and loss
plots from report/ through `on_stage` / `on_done`) and prints nothing itself. Where the run
goes and what it shares with others is one typed RunOptions.

The model lives on the experiment's `device` (factlab.models.device); training, scoring and
generation follow it. Under `accelerate launch` with several processes (factlab.train.
distributed) every process runs the same preflight and trains its slice of each batch; only
rank 0 evaluates and writes the run folder and the store, the others wait for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console

from factlab.config import Experiment, dump_experiment
from factlab.data.sft import require_chat_template
from factlab.errors import FactlabError
from factlab.experiment.events import RunEvents
from factlab.experiment.evaluation import Evaluator, forgetting, load_probe_files
from factlab.experiment.run_folder import BASE, CONTEXT, EvalRecord, RunFolder, RunResults, StageRecord
from factlab.experiment.store import RunStore
from factlab.experiment.sweep_cache import SweepCache
from factlab.models.device import check_training_device, resolve_device
from factlab.models.loading import load_model, resolve_model
from factlab.models.targets import resolve_targets
from factlab.methods import check_stage_order
from factlab.train import distributed
from factlab.train.data import build_stage_examples, load_stage_data
from factlab.train.stage import train_stage


@dataclass
class RunOptions:
    """Where a run goes and what it is part of; the defaults are a plain `factlab run`."""

    run_dir: Path | None = None
    """The run folder (default: a new time-stamped folder under the experiment's output_dir)."""
    store: RunStore | None = None
    """The run store that indexes the run: `running`, then `done` with its metrics or `failed`."""
    sweep: str | None = None
    """The sweep (or tune study) the run is a point of, as the store records it."""
    point: dict | None = None
    """The point's overrides (a trial: its number and parameters)."""
    label: str | None = None
    mlflow: bool = False
    """Also log the run to MLflow."""
    cache: SweepCache | None = None
    """The sweep's reuse cache: work shared by its points (see SweepCache)."""


@dataclass
class RunInputs:
    """What the preflight made ready for the run: the model and everything checked against it."""

    model: object
    tokenizer: object
    model_path: Path
    probes: list
    raw_data: list
    """Each stage's StageInputs (factlab.train.data)."""
    stage_examples: list
    """Each stage's tokenized examples."""
    context: str | None
    """The corpus as one prompt text, for eval.in_context."""
    names: list[str]
    """The stages' names."""


def _stage_inputs(exp: Experiment, i: int) -> tuple[list[str] | None, str | None]:
    st = exp.stages[i]
    return st.data.corpus or exp.data.corpus, st.data.qa or exp.data.qa


def _general_replay(exp: Experiment, raw_data: list, model, tokenizer, console: Console) -> list:
    """The stages' data again, with the replay and anchor source `general` meaning text sampled
    from the model itself (cached by its fingerprint) when the model is not the embedded
    SmolLM2, whose own text ships as the builtin replay (see factlab.data.replay)."""
    from factlab.data.replay import replay_documents_for, uses_builtin_replay

    uses = [i for i, st in enumerate(exp.stages)
            if (st.data.replay and st.data.replay.ratio > 0 and "general" in st.data.replay.source)
            or (st.train.anchor and "general" in st.train.anchor.source)
            or (st.edit is not None and "general" in st.edit.cov_source)]
    if not uses or uses_builtin_replay(exp.model):
        return raw_data
    from factlab.data.replay import DEFAULT_REPLAY_TOKENS

    # an edit's key covariance asks for edit.cov_tokens of it
    want = max([DEFAULT_REPLAY_TOKENS] + [st.edit.cov_tokens for st in exp.stages
                                          if st.edit is not None and "general" in st.edit.cov_source])
    general = replay_documents_for(exp.model, model, tokenizer, n_tokens=want, console=console)
    raw_data = list(raw_data)
    for i in uses:
        st = exp.stages[i]
        raw_data[i] = load_stage_data(st, *_stage_inputs(exp, i), substitute=st.data.substitute or exp.data.substitute,
                                      general=general)
    return raw_data


def _sft_conversations(exp: Experiment, raw_data: list) -> list | None:
    """The first SFT stage's training conversations (their prompts measure style)."""
    return next((raw.main for st, raw in zip(exp.stages, raw_data) if st.kind == "sft"), None)


def run_experiment(exp: Experiment, options: RunOptions | None = None, events: RunEvents | None = None) -> Path:
    """Run every stage of `exp`; return the run folder. With `options.store`, the run is
    indexed there: `running` when its folder is created, `done` with its metrics at the end,
    `failed` with the error if it raises. A sweep passes its `options.cache` (work shared by
    its points). `events` is told of every step (experiment.events.RunEvents; its on_stage /
    on_done are the caller's presentation, and with `mlflow` the CLI's on_done adds the
    report to that MLflow run)."""
    options = options or RunOptions()
    events = events or RunEvents()
    main = distributed.is_main()
    if not main:  # the other processes of a launch train quietly; rank 0 speaks for them
        events = RunEvents(Console(stderr=True, quiet=True))
    device = resolve_device(exp.device)
    if exp.stages:
        check_training_device(device)
    if distributed.processes() > 1:
        if options.cache is not None or options.sweep is not None:
            raise FactlabError("several processes run one experiment (factlab run); run sweeps with --workers instead")
        for st, name in zip(exp.stages, exp.stage_names()):
            distributed.per_process_batch(st.train.batch_size, name)
    distributed.start(device)
    inputs = _preflight(exp, options, events.console, device)

    # --- the run ------------------------------------------------------------------------------
    if not main:
        # Rank 0 names the folder (its name has a time stamp): the others need it for the
        # stages' checkpoints, which early stopping reloads in every process.
        folder = RunFolder(Path(distributed.broadcast(None)))
        _train_along(exp, inputs, folder)
        return folder.path
    folder = RunFolder(options.run_dir) if options.run_dir is not None else RunFolder.create(Path(exp.output_dir), exp.name)
    folder.path.mkdir(parents=True, exist_ok=True)
    distributed.broadcast(str(folder.path))
    store = options.store
    if store is not None:
        store.start(folder.path, exp.name, exp.model_dump(mode="json"), sweep=options.sweep, point=options.point,
                    label=options.label)
    try:
        results = _run(exp, inputs, folder, options.cache, events)
    except BaseException as e:
        if store is not None:
            store.fail(folder.path, f"{type(e).__name__}: {e}")
        raise
    if store is not None:
        store.finish(folder.path, results)
    mlflow_run = None
    if options.mlflow:
        from factlab.experiment.mlflow_log import log_run

        mlflow_run = log_run(folder.path, exp.model_dump(mode="json"), results, experiment=options.sweep or exp.name,
                             label=options.label)
    events.run_done(folder, results, mlflow_run)
    distributed.barrier()
    return folder.path


def _preflight(exp: Experiment, options: RunOptions, console: Console, device) -> RunInputs:
    """Everything a user can get wrong, before any write: data files, probes, the model (loaded
    here, onto `device`), chat templates, probe lengths, layer groups, the in-context corpus."""
    if options.mlflow:
        from factlab.experiment.mlflow_log import require_mlflow

        require_mlflow()
    main = distributed.is_main()
    check_stage_order(exp.stages)  # a stage after a prompt method (cannot merge) fails here, not after training
    probes = load_probe_files(exp.eval.probes)
    raw_data = [load_stage_data(st, *_stage_inputs(exp, i), substitute=st.data.substitute or exp.data.substitute)
                for i, st in enumerate(exp.stages)]
    from factlab.experiment.preflight import check_in_context_length, check_probe_lengths, in_context_text

    context = in_context_text(exp)
    if main:
        model_path = resolve_model(exp.model, console)  # a first use converts (writes the cache)
    distributed.barrier()
    if not main:
        model_path = resolve_model(exp.model, console)
    model, tokenizer = load_model(model_path, device=device)
    if any(st.kind == "sft" for st in exp.stages):
        require_chat_template(tokenizer, "SFT stages")
    if any(p.kind == "qa" for p in probes):
        require_chat_template(tokenizer, "qa probes")
    check_probe_lengths(probes, tokenizer, model)
    for st in exp.stages:
        if st.kind == "edit":  # an architecture edit cannot write into fails here, before any sampling
            from factlab.train.edit import edit_target

            edit_target(model, st.edit)
    raw_data = _general_replay(exp, raw_data, model, tokenizer, console)
    stage_examples = []
    for st, raw in zip(exp.stages, raw_data):
        resolve_targets(model, list(st.peft.targets), st.peft.layers)  # unknown groups fail here
        stage_examples.append(build_stage_examples(st, tokenizer, raw, seed=st.train.seed if st.train.seed is not None else exp.seed))
    check_in_context_length(context, tokenizer, model)
    return RunInputs(model, tokenizer, model_path, probes, raw_data, stage_examples, context, exp.stage_names())


def _train_along(exp: Experiment, inputs: RunInputs, folder: RunFolder) -> None:
    """A process other than rank 0 of a data-parallel launch: train every stage with the
    others (train_stage writes nothing here), and wait while rank 0 evaluates."""
    quiet = Console(stderr=True, quiet=True)
    model, tokenizer, stage_examples, names = inputs.model, inputs.tokenizer, inputs.stage_examples, inputs.names
    distributed.barrier()  # rank 0: the base evaluation(s)
    for i, (st, name) in enumerate(zip(exp.stages, names)):
        model, _ = train_stage(model, tokenizer, st, name, folder.stage_path(i, name), stage_examples[i], exp.seed, quiet)
        distributed.barrier()  # rank 0: this stage's evaluation
    distributed.barrier()  # rank 0: results, store, report


def _reuse_or_evaluate(cache: SweepCache | None, key: str | None, label: str, folder: RunFolder, events: RunEvents,
                       evaluate: Callable[[], EvalRecord]) -> EvalRecord:
    """An untrained-model evaluation from the sweep cache (its score files copied over), or
    made now and kept there."""
    hit = cache.evaluation(key) if cache is not None and key is not None else None
    if hit is not None:
        source, ev = hit
        events.evaluation_reused(label, source)
        folder.copy_scores(source, label)
        return ev
    ev = evaluate()
    if cache is not None and key is not None:
        cache.keep_evaluation(key, folder, ev)
    return ev


def _run(exp: Experiment, inputs: RunInputs, folder: RunFolder, cache: SweepCache | None, events: RunEvents) -> RunResults:
    """The run proper, after preflight: evaluations and stages, each recorded in results.json
    as soon as it is done; returns the complete RunResults.

    With a sweep's `cache`, work the points share is reused (see SweepCache): a reused
    stage's folder is hard-linked from the run that trained it, its model loaded from its
    merged/ folder, and its record says `reused_from`."""
    model, tokenizer, model_path, context = inputs.model, inputs.tokenizer, inputs.model_path, inputs.context
    stage_examples, console = inputs.stage_examples, events.console
    folder.write_config(dump_experiment(exp))
    events.run_started(folder, model_path)
    sft_convs = _sft_conversations(exp, inputs.raw_data)
    evaluator = Evaluator(exp.eval, inputs.probes, tokenizer, seed=exp.seed, folder=folder, console=console,
                          conversations=sft_convs)
    results = RunResults(name=exp.name, model=str(model_path), seed=exp.seed)

    def record(ev: EvalRecord) -> None:
        results.add(ev)
        folder.write_results(results)

    key = SweepCache.base_key(exp, model_path, sft_convs) if cache is not None else None
    base_eval = _reuse_or_evaluate(cache, key, BASE, folder, events, lambda: evaluator.evaluate(BASE, model))
    record(base_eval)
    if context is not None:
        # keyed on the context text itself: a sweep over a stage's corpus changes it
        ctx_key = SweepCache.context_key(key, context) if key is not None else None
        record(_reuse_or_evaluate(cache, ctx_key, BASE + CONTEXT, folder, events,
                                  lambda: evaluator.evaluate(BASE + CONTEXT, model, context=context, with_perplexity=False)))
    distributed.barrier()  # the other processes of a launch wait here (see _train_along)
    for i, (st, name) in enumerate(zip(exp.stages, inputs.names)):
        out = folder.stage_path(i, name)
        skey = SweepCache.stage_key(key, exp, i, stage_examples) if key is not None and i < len(exp.stages) - 1 else None
        hit = cache.stage(skey) if cache is not None and skey is not None else None
        if hit is not None:
            source, entry, ev = hit
            SweepCache.link_stage(source, entry, out)
            folder.copy_scores(source, name)
            stage = replace(entry, reused_from=str(source.stage_dir(entry)))
            device = next(model.parameters()).device
            del model
            model, _ = load_model(folder.merged_model(stage), device=device)
            events.stage_reused(name, source)
        else:
            model, res = train_stage(model, tokenizer, st, name, out, stage_examples[i], exp.seed, console)
            events.stage_trained(name, res)
            stage = StageRecord(name, RunFolder.stage_folder_name(i, name),
                                metrics={k: v for k, v in asdict(res).items() if k not in ("name", "loss_history")})
            ev = evaluator.evaluate(name, model)
        results.stages.append(stage)
        ev = replace(ev, forgetting=forgetting(base_eval, ev))
        record(ev)
        distributed.barrier()  # the other processes of a launch wait for this evaluation
        events.stage_done(folder, stage)
        if hit is None and skey is not None and stage.merged:
            cache.keep_stage(skey, folder, stage, ev)
    return results
