"""How much a stage will train, known before it trains.

A stage's optimizer steps follow from its examples, batch size and epochs, and a plausible
first experiment can end up with very few (50 short documents packed into 7 blocks at batch
size 8 make one step an epoch: 8 steps in 8 epochs, too few for any fact to stick). The plan is
printed and stored with the stage's results, and `warning()` says what to change when it is
too small.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MIN_STEPS = 30
"""Below this many optimizer steps, a stage rarely moves a fact (see the README's step-aware
training section for the measurement behind it)."""
MIN_EXPOSURES = 3.0
"""Below this many passes over each training example, facts rarely stick."""


@dataclass(frozen=True)
class StepPlan:
    """What a stage will do: examples, optimizer steps, tokens and passes over the data."""

    examples: int
    """Training examples after packing (replay and held-out excluded)."""
    replay_examples: int
    heldout_examples: int
    batch_size: int
    """Examples per optimizer step (batch_size × grad_accum)."""
    optimizer_steps: int
    tokens: int
    """Non-padding tokens the stage trains on, all steps together."""
    exposures: float
    """How many times each training example (so each document) is seen."""
    documents: int | None = None
    """Documents behind the examples (CPT), when known."""

    def to_dict(self) -> dict:
        return asdict(self)


def plan_stage(train_examples: list[dict], *, batch_size: int, grad_accum: int, epochs: float,
               max_steps: int | None, replay_examples: int = 0, heldout_examples: int = 0,
               documents: int | None = None) -> StepPlan:
    """The step plan of a stage as the Trainer will run it.

    `train_examples` are the examples the Trainer gets (main + replay, held-out share removed);
    the Trainer makes ceil(len / (batch_size × grad_accum)) optimizer steps an epoch (the last
    batch may be short) and `epochs` epochs (a fraction rounds up to whole steps), unless
    `max_steps` is set.
    """
    n = len(train_examples)
    per_step = batch_size * grad_accum
    steps_per_epoch = max(1, math.ceil(n / per_step)) if n else 0
    steps = max_steps if max_steps else math.ceil(steps_per_epoch * epochs)
    # The Trainer walks the shuffled examples an epoch at a time, so every example is seen
    # once per `steps_per_epoch` steps.
    exposures = steps / steps_per_epoch if steps_per_epoch else 0.0
    tokens_per_pass = sum(sum(e["attention_mask"]) for e in train_examples)
    return StepPlan(examples=n - replay_examples, replay_examples=replay_examples,
                    heldout_examples=heldout_examples, batch_size=per_step, optimizer_steps=steps,
                    tokens=round(tokens_per_pass * exposures), exposures=round(exposures, 3),
                    documents=documents)


def warning(plan: StepPlan, stage: str) -> str | None:
    """One line saying what to change when the plan is too small to teach facts, else None."""
    problems = []
    if plan.optimizer_steps < MIN_STEPS:
        problems.append(f"only {plan.optimizer_steps} optimizer steps")
    if plan.exposures < MIN_EXPOSURES:
        problems.append(f"each example seen {plan.exposures:g} times")
    if not problems:
        return None
    fixes = []
    if plan.optimizer_steps < MIN_STEPS:
        fixes.append(f"lower train.batch_size (now {plan.batch_size} examples a step)")
        fixes.append("use train.packing: documents (one example per document)")
    fixes.append("raise train.epochs")
    return (f"stage {stage}: {' and '.join(problems)} ({plan.examples} examples); facts rarely stick under "
            f"{MIN_STEPS} steps and {MIN_EXPOSURES:g} passes: " + ", ".join(fixes))
