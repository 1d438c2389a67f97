"""One training stage, read top to bottom in `train_stage`:

  prepare_stage   check the model, seed, split off held-out examples, wrap the model with a
                  fresh adapter (or unfreeze its targeted weights for `full`), build the
                  optimizer and the Trainer                                  -> PreparedStage
  fit             train (NEFTune on, the update cap hooked in), then score the held-out
                  and the training examples in eval mode                     -> Fit
  save_stage      save adapter / merged model (factlab.train.merge), write train.json, and
                  move the finished folder into place                        -> (model, StageResult)

The stage's data comes first, apart from any model (factlab.train.data: `load_stage_data`
reads the files, so bad files are reported before anything is loaded, and
`build_stage_examples` tokenizes them); its batches are built by factlab.train.collators and
its precision is resolved by factlab.train.precision.

The Trainer is used (not a hand-written loop) so that gradient accumulation, schedulers,
held-out evaluation, early stopping and `accelerate launch` scale-out come from the
library the field uses. What factlab adds: PEFT methods by name, layer-group targets,
per-group learning rates, NEFTune that reaches every method's embedding, forgetting controls
(L2 to the base weights, an update-norm cap; see factlab.train.regularizers), bf16 autocast
where the CPU measures it faster at the model's shapes (factlab.train.bf16_probe), with the
frozen weights stored in bf16 (factlab.train.precision),
a loss that never builds full-vocabulary logits (factlab.train.loss), a rich progress bar with
tokens/s, and the saved artefacts of a stage (see factlab.train.merge for what each method
saves).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from transformers import (
    EarlyStoppingCallback,
    PrinterCallback,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from factlab.config import StageSpec, TrainSpec
from factlab.data.corpus import builtin_replay_documents
from factlab.errors import FactlabError
from factlab.methods import MethodInfo, method_info
from factlab.models.device import check_training_device
from factlab.models.targets import TargetSpec
from factlab.train.anchor import Anchor, anchor_blocks
from factlab.train.bf16_probe import first_time
from factlab.train.collators import stage_collator
from factlab.train.compiling import compiled_blocks
from factlab.train.loss import LossPath, fused_loss, loss_path
from factlab.train.merge import SavedStage, save_trained
from factlab.train.plan import StepPlan, plan_stage, warning as plan_warning
from factlab.train.peft_methods import align_virtual_token_logits, build_peft_model, is_peft_model
from factlab.train.data import StageExamples, split_heldout
from factlab.train.precision import frozen_weights_in_bf16, resolve_precision
from factlab.train.progress import RichProgress, peak_rss_mb, reset_peak_rss
from factlab.train.regularizers import L2ToBase, RegularizedTrainer, UpdateNormCap, neftune
from factlab.train import distributed


# ---------------------------------------------------------------------------------------
# The stage


@dataclass
class StageResult:
    """A stage's record, saved as its train.json (loss_history: one entry per logged step)."""

    name: str
    kind: str
    steps: int
    examples: int
    heldout_examples: int
    train_tokens: int
    seconds: float
    tokens_per_second: float
    bf16: bool
    trainable_params: int
    total_params: int
    target_modules: int
    first_loss: float | None
    final_loss: float | None
    eval_loss: float | None
    """Mean loss on the held-out examples after training (train.eval_fraction > 0)."""
    train_loss_after: float | None
    """Mean loss on the training examples after training, in eval mode (no NEFTune noise, no
    dropout): the number to set against eval_loss (only with train.eval_fraction > 0)."""
    peak_rss_mb: float
    """Peak resident memory of the process so far (MB)."""
    stopped_early: bool
    merged: bool
    """A merged/ folder loadable by plain transformers was saved and is the model returned."""
    method: str = "lora"
    trainable_share: float = 0.0
    """trainable_params / total_params."""
    artifact: str = "adapter"
    """What carries the stage's result: `adapter` (adapter/, PEFT format) or `model` (merged/,
    full fine-tuning)."""
    artifact_bytes: int = 0
    """Bytes of that artefact as saved (adapter/ files; for full fine-tuning the model files of
    merged/, without the tokenizer)."""
    merge_note: str | None = None
    """Why the stage was not merged (merge: false, or a method that cannot merge)."""
    train_peak_rss_mb: float | None = None
    """Peak resident memory during this stage's training alone (MB; Linux, else None)."""
    l2_to_base_final: float | None = None
    """With train.l2_to_base: sum ||W_merged - W_base||_F^2 after the last step (unscaled)."""
    update_norm_capped_steps: int | None = None
    """With train.max_update_norm: optimizer steps whose update was scaled back onto the cap."""
    loss_path: str = "standard"
    """`fused` (labelled positions only, lm_head in chunks; factlab.train.loss) or `standard`
    (the model's own loss)."""
    loss_path_note: str | None = None
    """Why the standard loss was used."""
    plan: dict | None = None
    """The step plan made before training (factlab.train.plan.StepPlan): examples, replay,
    optimizer steps, tokens, passes over the data, and the warning if it was too small."""
    loss_history: list[dict] = field(default_factory=list)
    precision: str = "fp32"
    """What the stage computed in: `bf16` or `fp16` autocast, or `fp32` (see stage_precision)."""
    precision_note: str | None = None
    """Why, on the CPU: train.bf16 as set, no native bf16, or with `auto` the measured bf16 /
    fp32 speed at the model's shapes (factlab.train.bf16_probe)."""
    device: str = "cpu"
    """The device type it trained on (cpu, cuda, mps)."""
    processes: int = 1
    """Data-parallel processes that trained it (accelerate launch); batch_size is their total."""
    edit: dict | None = None
    """A `kind: edit` stage's record (factlab.train.edit): method, layers, modules, facts, the
    covariance's tokens and cache use, per batch the value optimisation and update norms,
    seconds_per_fact. For an edit, first/final_loss are the objects' mean NLL per token after
    the edit prompts before / after the edit, steps the batches, trainable_params the edited
    weights."""


@dataclass
class PreparedStage:
    """Everything a stage's training needs, built before its first step."""

    name: str
    stage: StageSpec
    method: MethodInfo
    seed: int
    """The stage's seed (train.seed, else the experiment's)."""
    bf16: bool
    model: object
    """The model to train: a PeftModel, or for `full` the model itself."""
    targets: TargetSpec
    trainable_params: int
    total_params: int
    train_examples: list[dict]
    heldout_examples: list[dict]
    trainer: RegularizedTrainer
    l2: L2ToBase | None
    cap: UpdateNormCap | None
    partial: Path
    """The folder being written (`out_dir` + ".partial"), renamed to `out_dir` at the end."""
    out_dir: Path
    plan: StepPlan | None = None
    """What the stage will do (steps, tokens, passes), printed before it trains."""
    precision: str = "fp32"
    """bf16, fp16 (autocast) or fp32: train.bf16 resolved for the model's device."""
    loss_path: LossPath = field(default_factory=lambda: LossPath("standard"))
    precision_note: str | None = None
    """Why that precision (on the CPU; see resolve_precision)."""


@dataclass
class Fit:
    """What training measured, beyond the Trainer's own state (trainer.state)."""

    seconds: float
    log_history: list[dict]
    """The Trainer's log of the training run itself (before the final evaluations, which
    would log their losses there too)."""
    train_peak_rss_mb: float | None
    eval_loss: float | None
    train_loss_after: float | None
    l2_to_base_final: float | None


def train_stage(
    model,
    tokenizer,
    stage: StageSpec,
    name: str,
    out_dir: Path,
    examples: list[dict],
    seed: int,
    console: Console | None = None,
) -> tuple[object, StageResult]:
    """Train one stage and save its outputs into `out_dir`. Returns (model for the next stage, StageResult).

    The model returned is the merged plain model when `stage.merge` and the method merges, the
    trained model itself for `full`, else the PEFT model (prompt methods, or merge: false).
    `out_dir` is written through a `.partial` sibling and renamed at the end, so a stage that
    fails leaves no half-written folder and earlier stages' folders untouched.
    """
    if stage.kind == "edit":  # no training: a closed-form change of the weights (factlab.train.edit)
        from factlab.train.edit import edit_stage

        return edit_stage(model, tokenizer, stage, name, out_dir, examples, seed, console or Console(stderr=True))
    prepared = prepare_stage(model, tokenizer, stage, name, out_dir, examples, seed, console or Console(stderr=True))
    measured = fit(prepared)
    return save_stage(prepared, measured, tokenizer)


def check_fresh_model(model, name: str) -> None:
    """FactlabError if `model` still carries an unmerged adapter: a new adapter would stack on
    top of it and nothing saved would describe the result."""
    if not is_peft_model(model):
        return
    prev = str(model.active_peft_config.peft_type.value).lower()
    if getattr(model.active_peft_config, "is_prompt_learning", False):
        raise FactlabError(f"stage '{name}' would train on top of the previous stage's {prev} adapter; "
                           f"method {prev} cannot merge; make it the last stage")
    raise FactlabError(f"stage '{name}' would train on top of the previous stage's unmerged {prev} adapter; "
                       "set merge: true on the previous stage or make it the last stage")


def prepare_stage(model, tokenizer, stage: StageSpec, name: str, out_dir: Path, examples: list[dict],
                  seed: int, console: Console) -> PreparedStage:
    """Wrap `model` for the stage's method and build its Trainer; creates `out_dir`.partial."""
    tr = stage.train
    method = method_info(stage.peft.method)
    check_fresh_model(model, name)
    seed = tr.seed if tr.seed is not None else seed
    # The stage trains where the model is (the runner put it on the experiment's device).
    device = next(model.parameters()).device
    check_training_device(device)
    precision, precision_note = resolve_precision(tr.bf16, device, model)
    bf16 = precision == "bf16"
    if tr.bf16 == "auto" and precision_note and first_time(precision_note):
        console.print(f"precision: {precision} ({precision_note})", markup=False, highlight=False)
    per_process = distributed.per_process_batch(tr.batch_size, name)
    if stage.kind == "distill":
        examples = _distill_targets(model, tokenizer, stage, method, examples, precision, console)
    train_ex, eval_ex = split_heldout(examples, tr.eval_fraction, seed)
    plan = plan_stage(train_ex, batch_size=tr.batch_size, grad_accum=tr.grad_accum, epochs=tr.epochs,
                      max_steps=tr.max_steps, replay_examples=getattr(examples, "replay", 0),
                      heldout_examples=len(eval_ex), documents=getattr(examples, "sources", None) or None)
    console.print(f"stage {name}: {plan.optimizer_steps} optimizer steps of {plan.batch_size} examples, "
                  f"{plan.examples} examples ({plan.replay_examples} replay) from {plan.documents} "
                  f"{'conversations' if stage.kind == 'sft' else 'documents'}, each seen {plan.exposures:g} times, "
                  f"{plan.tokens:,} tokens", markup=False, highlight=False)
    if (w := plan_warning(plan, name)) is not None:
        console.print(f"warning: {w}", style="yellow", markup=False, highlight=False)

    set_seed(seed)  # adapter initialisation is random: seed it before wrapping
    peft_model, targets = build_peft_model(model, stage.peft)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    # Built before training: for full fine-tuning it copies the starting weights.
    l2 = L2ToBase(peft_model) if tr.l2_to_base > 0 else None
    # The fused loss is checked against the model's own on the start of the first example.
    check_ids = torch.tensor([train_ex[0]["input_ids"][:16]]) if train_ex and len(train_ex[0]["input_ids"]) > 1 else None
    path = loss_path(peft_model, tr.fused_loss, check_ids)

    partial = out_dir.with_name(out_dir.name + ".partial")
    if distributed.is_main():  # several processes: the first one writes (see save_stage)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    args = _training_arguments(tr, partial / "checkpoints", seed, precision, has_eval=bool(eval_ex),
                               device=device, batch_size=per_process)
    optimizer = torch.optim.AdamW(param_groups(peft_model, tr.lr, tr.embed_lr, tr.weight_decay, tr.head_lr), lr=tr.lr)
    cap = UpdateNormCap(optimizer, tr.max_update_norm) if tr.max_update_norm else None
    callbacks: list[TrainerCallback] = [RichProgress(console, f"{name} ({stage.kind}, {method.name})")]
    if tr.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=tr.early_stopping_patience))
    trainer_cls, extra = RegularizedTrainer, {}
    if stage.kind == "distill":
        from factlab.train.distill import DistillTrainer

        trainer_cls, extra = DistillTrainer, {"temperature": stage.distill.temperature, "chunked": path.name == "fused"}
    trainer = trainer_cls(
        model=peft_model,
        args=args,
        train_dataset=train_ex,
        eval_dataset=eval_ex or None,
        data_collator=stage_collator(peft_model, tokenizer, stage, method),
        callbacks=callbacks,
        optimizers=(optimizer, None),
        l2_to_base=l2,
        l2_coef=tr.l2_to_base,
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # our progress bar replaces the printed log dicts
    if tr.anchor:
        blocks = getattr(examples, "anchor_blocks", None)
        if blocks is None:  # examples built by hand (benchmarks): the builtin general text
            blocks = anchor_blocks(tokenizer, builtin_replay_documents(), tr.anchor.seq_len)
        micro = args.per_device_train_batch_size
        # Built after the Trainer: its autocast is the one the stage's forward runs under; for
        # full fine-tuning it scores the starting model's blocks before the first step.
        trainer.anchor = Anchor(peft_model, blocks, tr.anchor, rows_per_call=micro,
                                calls=plan.optimizer_steps * args.gradient_accumulation_steps, seed=seed,
                                autocast=trainer.accelerator.autocast)
        console.print(f"stage {name}: anchor KL x{tr.anchor.kl:g} on {trainer.anchor.per_call} block(s) of "
                      f"{tr.anchor.seq_len} general-text tokens per {micro} examples, from {len(blocks)} blocks",
                      markup=False, highlight=False)
    return PreparedStage(name, stage, method, seed, bf16, peft_model, targets, trainable, total,
                         train_ex, eval_ex, trainer, l2, cap, partial, out_dir, plan, precision, path,
                         precision_note=precision_note)


def _distill_targets(model, tokenizer, stage: StageSpec, method: MethodInfo, items: list[dict], precision: str,
                     console: Console) -> StageExamples:
    """A distill stage's training examples: its items with the teacher's top-k targets,
    computed from `model` as it starts the stage (no adapter yet: the teacher is the starting
    model itself)."""
    from factlab.train.distill import attach_teacher, describe, refuse_prompt_methods

    refuse_prompt_methods(method.name, not method.merges)
    t0 = time.perf_counter()
    examples = StageExamples(attach_teacher(model, tokenizer, items, stage.distill, stage.train.seq_len, precision))
    examples.sources, examples.replay = getattr(items, "sources", 0), getattr(items, "replay", 0)
    if not examples:
        raise FactlabError("the distill stage has nothing to distil: every document and answer is empty")
    console.print(f"distill teacher: {describe(examples)} examples, top-{stage.distill.top_k} targets "
                  f"in {time.perf_counter() - t0:.1f} s", markup=False, highlight=False)
    return examples


def _training_arguments(tr: TrainSpec, ckpt_dir: Path, seed: int, precision: str, has_eval: bool,
                        device: torch.device, batch_size: int) -> TrainingArguments:
    """The Trainer's arguments. `batch_size` is this process's share of train.batch_size (all
    of it in one process); the Trainer's data-parallel sampler gives the processes consecutive
    slices of the same seeded order, so together they see the batches of a one-process run."""
    micro = min(tr.micro_batch_size or batch_size, batch_size)
    if batch_size % micro:
        raise FactlabError(f"train.micro_batch_size {tr.micro_batch_size} must divide each process's share of "
                           f"train.batch_size ({batch_size}); choose a divisor of {batch_size}")
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        # A batch of micro-batches is one more level of gradient accumulation (same steps);
        # batch_size is this process's share (see distributed.per_process_batch).
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=tr.grad_accum * (batch_size // micro),
        num_train_epochs=tr.epochs,
        max_steps=tr.max_steps or -1,
        learning_rate=tr.lr,
        lr_scheduler_type=tr.scheduler,
        warmup_steps=tr.warmup_steps or tr.warmup_ratio,  # a float < 1 is a ratio of the total
        weight_decay=tr.weight_decay,
        max_grad_norm=tr.max_grad_norm,
        # NEFTune is factlab's own hook (regularizers.neftune), never the Trainer's as well.
        neftune_noise_alpha=None,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device.type == "cpu",
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=tr.eval_steps,
        save_strategy="steps" if tr.early_stopping_patience else "no",
        save_steps=tr.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=bool(tr.early_stopping_patience),
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Data-parallel: every trainable parameter takes part in every forward (adapters, or
        # the targeted weights), so DDP need not search the graph for unused ones each step.
        ddp_find_unused_parameters=False,
        optim="adamw_torch",
    )


def param_groups(model, lr: float, embed_lr: float | None, weight_decay: float,
                  head_lr: float | None = None) -> list[dict]:
    """AdamW groups: parameters of the input embeddings get `embed_lr`, those of lm_head
    `head_lr` (when set; else they join the embeddings at `embed_lr`), the rest `lr`.
    Parameters of a LoRA on those layers count as theirs.

    Why by hand: the Trainer gives one learning rate to every parameter, and CPT recipes that
    train embed_tokens/lm_head want a smaller one there.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    emb_ids = {id(p) for p in inp.parameters()} if inp is not None else set()
    head_ids = {id(p) for p in out.parameters()} if out is not None else set()
    if head_lr is None:  # one group for both, as before head_lr existed
        emb_ids |= head_ids
        head_ids = set()
    main, emb, head = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A still-tied matrix is both: it stays with the embeddings.
        (emb if id(p) in emb_ids else head if id(p) in head_ids else main).append(p)
    groups = [{"params": main, "lr": lr, "weight_decay": weight_decay},
              {"params": emb, "lr": embed_lr or lr, "weight_decay": weight_decay},
              {"params": head, "lr": head_lr or embed_lr or lr, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def fit(prepared: PreparedStage) -> Fit:
    """Train, then score the held-out and the training examples; leaves the model in eval mode.

    While it trains and is scored, the model computes the fused loss when the stage uses it
    (factlab.train.loss), with bf16 on keeps its frozen matrices in bf16
    (factlab.train.precision: the fp32 values are back before anything else sees the model),
    and with train.compile runs its decoder layers compiled (factlab.train.compiling)."""
    tr = prepared.stage.train
    with ExitStack() as during:
        spill = f"frozen-fp32-rank{distributed.rank()}.safetensors"  # each process its own
        during.enter_context(frozen_weights_in_bf16(prepared.model, prepared.partial / spill,
                                                    enabled=prepared.bf16 and tr.bf16_weights))
        if prepared.loss_path.name == "fused":
            during.enter_context(fused_loss(prepared.model))
        during.enter_context(compiled_blocks(prepared.model, enabled=tr.compile))
        measured = _train_and_score(prepared)
    if prepared.l2 is not None:
        with torch.no_grad():
            measured.l2_to_base_final = float(prepared.l2())
        # Full fine-tuning: frees the copy of the starting weights before the model is saved.
        prepared.l2 = prepared.trainer.l2_to_base = None
    prepared.model.eval()
    return measured


def _train_and_score(prepared: PreparedStage) -> Fit:
    tr, trainer = prepared.stage.train, prepared.trainer
    own_peak = reset_peak_rss()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), neftune(prepared.model, tr.neftune_alpha):
            warnings.filterwarnings("ignore", message=".*use_cpu.*")
            trainer.train()
    finally:
        if prepared.cap is not None:
            prepared.cap.remove()
    seconds = time.perf_counter() - t0
    train_peak = peak_rss_mb() if own_peak else None
    history = list(trainer.state.log_history)
    eval_loss = train_loss_after = None
    if prepared.heldout_examples:
        eval_loss = float(trainer.evaluate()["eval_loss"])
        # The logged train losses are of single batches, taken with dropout and NEFTune noise
        # on; to set against the held-out loss, the training examples are scored the same way
        # (eval mode: no noise, no dropout) once training is done.
        train_loss_after = float(trainer.evaluate(eval_dataset=prepared.train_examples,
                                                  metric_key_prefix="train")["train_loss"])
    return Fit(seconds, history, train_peak, eval_loss, train_loss_after, None)


def save_stage(prepared: PreparedStage, measured: Fit, tokenizer) -> tuple[object, StageResult]:
    """Save the trained model and train.json, then move `out_dir`.partial to `out_dir`.
    Returns (model for the next stage, StageResult).

    Several processes (accelerate launch): each merges its own copy of the model in memory
    (they are identical after data-parallel training) for the next stage; only the first
    writes, and all of them wait until the folder is in place."""
    main = distributed.is_main()
    if main:
        shutil.rmtree(prepared.partial / "checkpoints", ignore_errors=True)
    saved = save_trained(prepared.model, tokenizer, prepared.method, prepared.stage.merge,
                         prepared.partial if main else None, prune=prepared.stage.train.prune_updates)
    if not prepared.method.merges:
        # Evaluated as base + adapter: make the logits line up with the input ids.
        align_virtual_token_logits(saved.model)
    result = stage_result(prepared, measured, saved)
    if main:
        (prepared.partial / "train.json").write_text(json.dumps(asdict(result), indent=2))
        shutil.rmtree(prepared.out_dir, ignore_errors=True)
        os.replace(prepared.partial, prepared.out_dir)
    distributed.barrier()
    return saved.model, result


def stage_result(prepared: PreparedStage, measured: Fit, saved: SavedStage) -> StageResult:
    """The stage's record (train.json) from what was prepared, measured and saved."""
    state, tr = prepared.trainer.state, prepared.stage.train
    losses = [h for h in measured.log_history if "loss" in h]
    evals = [h for h in measured.log_history if "eval_loss" in h]
    return StageResult(
        name=prepared.name,
        kind=prepared.stage.kind,
        steps=state.global_step,
        examples=len(prepared.train_examples),
        heldout_examples=len(prepared.heldout_examples),
        train_tokens=int(state.num_input_tokens_seen),
        seconds=round(measured.seconds, 2),
        tokens_per_second=round(state.num_input_tokens_seen / max(measured.seconds, 1e-9), 1),
        bf16=prepared.bf16,
        trainable_params=prepared.trainable_params,
        total_params=prepared.total_params,
        target_modules=len(prepared.targets.modules),
        first_loss=losses[0]["loss"] if losses else None,
        final_loss=losses[-1]["loss"] if losses else None,
        eval_loss=measured.eval_loss,
        train_loss_after=measured.train_loss_after,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        stopped_early=bool(tr.early_stopping_patience) and state.global_step < state.max_steps,
        merged=saved.merge_note is None,
        method=prepared.method.name,
        trainable_share=prepared.trainable_params / max(prepared.total_params, 1),
        artifact=saved.artifact,
        artifact_bytes=saved.artifact_bytes,
        merge_note=saved.merge_note,
        train_peak_rss_mb=measured.train_peak_rss_mb,
        l2_to_base_final=measured.l2_to_base_final,
        update_norm_capped_steps=prepared.cap.capped_steps if prepared.cap is not None else None,
        loss_path=prepared.loss_path.name,
        loss_path_note=prepared.loss_path.reason,
        plan=({**prepared.plan.to_dict(), "warning": plan_warning(prepared.plan, prepared.name)}
              if prepared.plan is not None else None),
        loss_history=[{"step": h["step"], "loss": h["loss"], **{k: h[k] for k in ("l2_to_base", "anchor_kl") if k in h}}
                      for h in losses]
        + [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in evals],
        precision=prepared.precision,
        precision_note=prepared.precision_note,
        device=next(prepared.model.parameters()).device.type,
        processes=distributed.processes(),
    )
