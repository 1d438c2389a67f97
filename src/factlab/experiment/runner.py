"""Run an experiment: load the model, score the probes, then for every stage train → merge →
save → score again, and record everything in the run folder (experiment/run_folder.py owns
its layout and records).

Everything that can be checked without training (data files, probes, layer groups, chat
template) is checked before the first write, so bad input never leaves a half-made run.
Presentation (tables, loss plots) is the caller's: it passes `on_stage` / `on_done`
callbacks (the CLI plugs in report/), so this module never imports the report.

The model lives on the experiment's `device` (factlab.models.device); training, scoring and
generation follow it. Under `accelerate launch` with several processes (factlab.train.
distributed) every process runs the same preflight and trains its slice of each batch; only
rank 0 evaluates and writes the run folder and the store, the others wait for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console

from factlab.config import Experiment, dump_experiment
from factlab.data.corpus import load_documents
from factlab.data.sft import require_chat_template
from factlab.errors import FactlabError
from factlab.evaluate.lm import max_positions
from factlab.experiment.evaluation import Evaluator, forgetting, load_probe_files
from factlab.experiment.run_folder import BASE, CONTEXT, EvalRecord, RunFolder, RunResults, StageRecord
from factlab.experiment.store import RunStore
from factlab.experiment.sweep import SweepCache
from factlab.models.device import check_training_device, resolve_device
from factlab.models.loading import load_model, resolve_model
from factlab.models.targets import resolve_targets
from factlab.methods import check_stage_order
from factlab.train import distributed
from factlab.train.data import build_stage_examples, load_stage_data
from factlab.train.stage import train_stage


StageCallback = Callable[[RunFolder, StageRecord], None]
RunCallback = Callable[[RunFolder, RunResults, "str | None"], None]


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
            or (st.train.anchor and "general" in st.train.anchor.source)]
    if not uses or uses_builtin_replay(exp.model):
        return raw_data
    general = replay_documents_for(exp.model, model, tokenizer, console=console)
    raw_data = list(raw_data)
    for i in uses:
        st = exp.stages[i]
        raw_data[i] = load_stage_data(st, *_stage_inputs(exp, i), substitute=st.data.substitute or exp.data.substitute,
                                      general=general)
    return raw_data


def _sft_conversations(exp: Experiment, raw_data: list) -> list | None:
    """The first SFT stage's training conversations (their prompts measure style)."""
    return next((raw.main for st, raw in zip(exp.stages, raw_data) if st.kind == "sft"), None)


def run_experiment(exp: Experiment, console: Console | None = None, run_dir: Path | None = None,
                   store: RunStore | None = None, sweep: str | None = None, point: dict | None = None,
                   label: str | None = None, mlflow: bool = False, cache: SweepCache | None = None,
                   on_stage: StageCallback | None = None, on_done: RunCallback | None = None) -> Path:
    """Run every stage of `exp`; return the run folder. With a `store`, the run is indexed
    there: `running` when its folder is created, `done` with its metrics at the end, `failed`
    with the error if it raises. A sweep passes its `cache` (work shared by its points).
    `on_stage(folder, stage)` is called after each stage is saved and evaluated, `on_done(folder,
    results, mlflow_run_id)` once the run is complete and logged (the CLI prints tables there,
    and with `mlflow` adds the report to that MLflow run)."""
    console = console or Console(stderr=True)
    names = exp.stage_names()
    main = distributed.is_main()
    if not main:  # the other processes of a launch train quietly; rank 0 speaks for them
        console = Console(stderr=True, quiet=True)
    device = resolve_device(exp.device)
    if exp.stages:
        check_training_device(device)
    if distributed.processes() > 1:
        if cache is not None or sweep is not None:
            raise FactlabError("several processes run one experiment (factlab run); run sweeps with --workers instead")
        for st, name in zip(exp.stages, names):
            distributed.per_process_batch(st.train.batch_size, name)
    distributed.start(device)

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
    from factlab.experiment.preflight import check_probe_lengths

    check_probe_lengths(probes, tokenizer, model)
    raw_data = _general_replay(exp, raw_data, model, tokenizer, console)
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
    if not main:
        # Rank 0 names the folder (its name has a time stamp): the others need it for the
        # stages' checkpoints, which early stopping reloads in every process.
        folder = RunFolder(Path(distributed.broadcast(None)))
        _train_along(exp, model, tokenizer, stage_examples, names, folder)
        return folder.path
    folder = RunFolder(run_dir) if run_dir is not None else RunFolder.create(Path(exp.output_dir), exp.name)
    folder.path.mkdir(parents=True, exist_ok=True)
    distributed.broadcast(str(folder.path))
    if store is not None:
        store.start(folder.path, exp.name, exp.model_dump(mode="json"), sweep=sweep, point=point, label=label)
    try:
        results = _run(exp, console, folder, model, tokenizer, model_path, probes, raw_data, stage_examples, context, names,
                       cache, on_stage)
    except BaseException as e:
        if store is not None:
            store.fail(folder.path, f"{type(e).__name__}: {e}")
        raise
    if store is not None:
        store.finish(folder.path, results)
    mlflow_run = None
    if mlflow:
        from factlab.experiment.mlflow_log import log_run

        mlflow_run = log_run(folder.path, exp.model_dump(mode="json"), results, experiment=sweep or exp.name, label=label)
    if on_done is not None:
        on_done(folder, results, mlflow_run)
    console.print(f"results: {folder.results_path}")
    distributed.barrier()
    return folder.path


def _train_along(exp: Experiment, model, tokenizer, stage_examples, names, folder: RunFolder) -> None:
    """A process other than rank 0 of a data-parallel launch: train every stage with the
    others (train_stage writes nothing here), and wait while rank 0 evaluates."""
    quiet = Console(stderr=True, quiet=True)
    distributed.barrier()  # rank 0: the base evaluation(s)
    for i, (st, name) in enumerate(zip(exp.stages, names)):
        model, _ = train_stage(model, tokenizer, st, name, folder.stage_path(i, name), stage_examples[i], exp.seed, quiet)
        distributed.barrier()  # rank 0: this stage's evaluation
    distributed.barrier()  # rank 0: results, store, report


def _reuse_or_evaluate(cache: SweepCache | None, key: str | None, label: str, folder: RunFolder, console: Console,
                       evaluate: Callable[[], EvalRecord]) -> EvalRecord:
    """An untrained-model evaluation from the sweep cache (its score files copied over), or
    made now and kept there."""
    hit = cache.evaluation(key) if cache is not None and key is not None else None
    if hit is not None:
        source, ev = hit
        console.print(f"[dim]{label} evaluation reused from {source.path} (same model, probes and settings)[/dim]")
        folder.copy_scores(source, label)
        return ev
    ev = evaluate()
    if cache is not None and key is not None:
        cache.keep_evaluation(key, folder, ev)
    return ev


def _run(exp, console, folder: RunFolder, model, tokenizer, model_path, probes, raw_data, stage_examples, context, names,
         cache: SweepCache | None = None, on_stage: StageCallback | None = None) -> RunResults:
    """The run proper, after preflight: evaluations and stages, each recorded in results.json
    as soon as it is done; returns the complete RunResults.

    With a sweep's `cache`, work the points share is reused (see SweepCache): a reused
    stage's folder is hard-linked from the run that trained it, its model loaded from its
    merged/ folder, and its record says `reused_from`."""
    folder.write_config(dump_experiment(exp))
    console.print(f"run folder: [bold]{folder.path}[/bold]  (model {model_path})")
    sft_convs = _sft_conversations(exp, raw_data)
    evaluator = Evaluator(exp.eval, probes, tokenizer, seed=exp.seed, folder=folder, console=console,
                          conversations=sft_convs)
    results = RunResults(name=exp.name, model=str(model_path), seed=exp.seed)

    def record(ev: EvalRecord) -> None:
        results.add(ev)
        folder.write_results(results)

    key = SweepCache.base_key(exp, model_path, sft_convs) if cache is not None else None
    base_eval = _reuse_or_evaluate(cache, key, BASE, folder, console, lambda: evaluator.evaluate(BASE, model))
    record(base_eval)
    if context is not None:
        # keyed on the context text itself: a sweep over a stage's corpus changes it
        ctx_key = SweepCache.context_key(key, context) if key is not None else None
        record(_reuse_or_evaluate(cache, ctx_key, BASE + CONTEXT, folder, console,
                                  lambda: evaluator.evaluate(BASE + CONTEXT, model, context=context, with_perplexity=False)))
    distributed.barrier()  # the other processes of a launch wait here (see _train_along)
    for i, (st, name) in enumerate(zip(exp.stages, names)):
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
            console.print(f"[dim]stage {name} reused from {source.path} (same model, settings, data and seed)[/dim]")
        else:
            model, res = train_stage(model, tokenizer, st, name, out, stage_examples[i], exp.seed, console)
            where = "" if res.device == "cpu" and res.processes == 1 else \
                f" on {res.device}" + (f" x {res.processes} processes" if res.processes > 1 else "")
            console.print(
                f"stage {name}: {res.steps} steps, loss {res.first_loss:.3f} → {res.final_loss:.3f}, "
                f"{res.tokens_per_second:,.0f} tok/s{f' ({res.precision})' if res.precision != 'fp32' else ''}{where}, "
                f"{res.seconds:.0f} s"
            )
            stage = StageRecord(name, RunFolder.stage_folder_name(i, name),
                                metrics={k: v for k, v in asdict(res).items() if k not in ("name", "loss_history")})
            ev = evaluator.evaluate(name, model)
        results.stages.append(stage)
        ev = replace(ev, forgetting=forgetting(base_eval, ev))
        record(ev)
        distributed.barrier()  # the other processes of a launch wait for this evaluation
        if on_stage is not None:
            on_stage(folder, stage)
        if hit is None and skey is not None and stage.merged:
            cache.keep_stage(skey, folder, stage, ev)
    return results
