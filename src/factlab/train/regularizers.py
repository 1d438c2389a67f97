"""Training-time regularizers: NEFTune noise, an L2 pull towards the base weights, and a cap on
the size of each optimizer step.

* **NEFTune** (`train.neftune_alpha`, Jain et al. 2023): during training steps, every input
  token embedding gets uniform noise in [-a, a] with a = alpha / sqrt(L * d), L the (padded)
  sequence length of the batch and d the hidden size; never in evaluation or generation.
* **L2 to base** (`train.l2_to_base`): the training loss gets
  ``coef * sum over changed weights of ||W_merged - W_base||_F^2``, i.e. the squared distance
  between the weights the stage would produce and the weights it started from (`l2_delta`).
* **Update-norm cap** (`train.max_update_norm`): after every optimizer step, if the global L2
  norm of the parameter change of that step exceeds the cap, the change is scaled back onto it
  (`UpdateNormCap`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from peft.utils.other import transpose
from torch import nn
from transformers import Trainer

from factlab.errors import FactlabError

# ---------------------------------------------------------------------------------------
# NEFTune
#
# Why our own hook and not TrainingArguments(neftune_noise_alpha=...): the Trainer's version
# (transformers 5.23, integrations/neftune.py) uses the same formula and the same train-only
# gate, but finds the embedding of a PEFT model as `peft_model.base_model.model
# .get_input_embeddings()`. For prompt / prefix / P-tuning the PeftModel's base_model is the
# transformers model itself, so that path only works where the causal LM happens to keep its
# backbone in `.model` (Llama); GPT-2, GPT-NeoX, GPT-J (`.transformer`, `.gpt_neox`) fail with
# AttributeError. `get_base_model().get_input_embeddings()` reaches the real embedding layer
# for every method (for LoRA on the embedding it is the LoRA-wrapped layer, so the noise is
# added once, after the adapter's delta). Only one of the two may be active, or the noise is
# applied twice: train_stage never passes neftune_noise_alpha to the Trainer.

_NEFTUNE_ATTR = "_factlab_neftune_alpha"


def neftune_scale(alpha: float, seq_len: int, hidden: int) -> float:
    """The noise bound a = alpha / sqrt(L * d)."""
    return alpha / math.sqrt(seq_len * hidden)


def _neftune_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    # Gate on the module's own mode: Trainer.evaluate() and generation run under model.eval(),
    # which reaches every submodule, so held-out losses and answers are never noised.
    if not module.training:
        return output
    bound = neftune_scale(getattr(module, _NEFTUNE_ATTR), output.size(1), output.size(2))  # output: (B, L, d)
    return output + torch.zeros_like(output).uniform_(-bound, bound)


def input_embedding_layer(model) -> nn.Module:
    """The input token embedding of a plain or PEFT-wrapped causal LM (the module whose output
    the decoder sees: for a LoRA on the embedding, the LoRA-wrapped layer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings()
    if emb is None:
        raise FactlabError(f"{type(base).__name__} exposes no input embedding; NEFTune cannot be applied")
    return emb


def activate_neftune(model, alpha: float):
    """Add NEFTune noise to `model`'s input embeddings in training mode. Returns the hook handle
    (pass it to deactivate_neftune). Refuses a second activation on the same layer."""
    emb = input_embedding_layer(model)
    if hasattr(emb, _NEFTUNE_ATTR) or hasattr(emb, "neftune_noise_alpha"):
        raise FactlabError("NEFTune is already active on this model's embedding; it must be applied once")
    setattr(emb, _NEFTUNE_ATTR, float(alpha))
    return emb.register_forward_hook(_neftune_hook)


def deactivate_neftune(model, handle) -> None:
    handle.remove()
    emb = input_embedding_layer(model)
    if hasattr(emb, _NEFTUNE_ATTR):
        delattr(emb, _NEFTUNE_ATTR)


@contextmanager
def neftune(model, alpha: float | None):
    """NEFTune active for the block (a no-op when alpha is None or 0)."""
    if not alpha:
        yield
        return
    handle = activate_neftune(model, alpha)
    try:
        yield
    finally:
        deactivate_neftune(model, handle)


# ---------------------------------------------------------------------------------------
# L2 to base
#
# One definition for every method: the squared Frobenius distance between the weights the
# stage would save (merged) and the ones it started from, summed over the changed tensors.
#   full     sum over trained parameters of ||w - w0||^2, w0 a frozen copy taken before
#            training (costs one copy of the trained parameters in memory)
#   LoRA     per adapted module ||scaling * B @ A||_F^2 (scaling = alpha/r, or alpha/sqrt(r)
#            with rslora), computed as scaling^2 * sum((B^T B) * (A A^T)) from r x r matrices,
#            never forming B @ A (same value for embedding LoRA, whose delta is (B A)^T)
#   DoRA     per adapted Linear ||W' - W||_F^2 with W' = m / ||W + s B A||_row * (W + s B A),
#            the weight PEFT's merge produces (the row norm is not detached here)
#   IA3      per adapted module ||W * (l - 1)||_F^2 (+ the bias term for output scaling):
#            exactly what merging the scaling vector l changes
# Prompt methods change no weight, so they have no such distance (FactlabError).


def _lora_term(module, adapter: str) -> torch.Tensor:
    s = module.scaling[adapter]
    if adapter in getattr(module, "lora_A", {}):
        a = module.lora_A[adapter].weight  # (r, in)
        b = module.lora_B[adapter].weight  # (out, r)
    else:  # embedding LoRA: A (r, num_embeddings), B (dim, r)
        a = module.lora_embedding_A[adapter]
        b = module.lora_embedding_B[adapter]
    return (s * s) * ((b.t() @ b) * (a @ a.t())).sum()


def _dora_term(module, adapter: str) -> torch.Tensor:
    if adapter not in getattr(module, "lora_A", {}):
        raise FactlabError("train.l2_to_base with DoRA on an embedding is not supported; drop `embed` from targets "
                           "or use lora")
    fifo = module.fan_in_fan_out
    w = module.get_base_layer().weight  # (out, in), or (in, out) for Conv1D
    delta = module.get_delta_weight(adapter)  # same layout as w, scaling included
    norm = module.lora_magnitude_vector[adapter].get_weight_norm(w, transpose(delta, fifo), scaling=1)  # (out,)
    factor = transpose((module.lora_magnitude_vector[adapter].weight / norm).view(-1, 1), fifo)
    return ((factor * (w + delta)) - w).pow(2).sum()


def _ia3_term(module, adapter: str) -> torch.Tensor:
    base = module.get_base_layer()
    scale = transpose(module.ia3_l[adapter], module.fan_in_fan_out)  # broadcasts over the weight
    total = (base.weight * (scale - 1)).pow(2).sum()
    if not module.is_feedforward and getattr(base, "bias", None) is not None:
        total = total + (base.bias * (module.ia3_l[adapter].reshape(base.bias.shape) - 1)).pow(2).sum()
    return total


class L2ToBase:
    """sum ||W_merged - W_base||_F^2 of a model being trained (see the table above)."""

    def __init__(self, model):
        self.terms: list = []
        self.reference: list[tuple[nn.Parameter, torch.Tensor]] = []
        peft_cfg = getattr(model, "active_peft_config", None)
        if peft_cfg is None:  # full fine-tuning: a frozen copy of every trained parameter
            self.reference = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
            return
        if getattr(peft_cfg, "is_prompt_learning", False):
            raise FactlabError(f"train.l2_to_base: {str(peft_cfg.peft_type.value).lower()} changes no weights "
                               "(it trains virtual tokens), so there is no distance to the base; remove l2_to_base")
        adapter = model.active_adapter
        for mod in model.modules():
            if isinstance(mod, LoraLayer) and adapter in mod.scaling:
                dora = bool(getattr(mod, "lora_magnitude_vector", None)) and adapter in mod.lora_magnitude_vector
                self.terms.append((_dora_term if dora else _lora_term, mod, adapter))
            elif isinstance(mod, IA3Layer) and adapter in mod.ia3_l:
                self.terms.append((_ia3_term, mod, adapter))
        if not self.terms:
            raise FactlabError(f"train.l2_to_base is not implemented for {peft_cfg.peft_type}; remove it")

    def __call__(self) -> torch.Tensor:
        """The distance (a scalar tensor that carries gradients to the trained parameters)."""
        parts = [fn(mod, ad) for fn, mod, ad in self.terms]
        parts += [(p - p0).pow(2).sum() for p, p0 in self.reference]
        return torch.stack([x.float() for x in parts]).sum()


class RegularizedTrainer(Trainer):
    """The Trainer with `l2_coef * L2ToBase()` and `anchor.spec.kl * anchor(model)` (the KL to
    the starting model on general text, factlab.train.anchor) added to the training loss.

    Why a compute_loss override and not Trainer(compute_loss_func=...): compute_loss_func
    receives only (outputs, labels) with the labels popped from the inputs, so it would have
    to redo the model's own causal-LM loss (label shift, ignore index, the virtual-token
    labels PEFT adds for prompt methods, num_items_in_batch). Calling super().compute_loss
    keeps the model's loss exactly as it is and adds the terms.

    Gradient accumulation: the Trainer divides compute_loss's result by the accumulation steps
    unless the loss is already normalised over the whole accumulated batch (the same test as
    Trainer.training_step); in that case the terms are divided here instead, so each
    optimizer step sees each term exactly once (the anchor: the mean over that step's blocks).
    Evaluation (held-out loss) gets no term.
    """

    def __init__(self, *args, l2_to_base: L2ToBase | None = None, l2_coef: float = 0.0, anchor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.l2_to_base, self.l2_coef = l2_to_base, l2_coef
        self.anchor = anchor
        self.last_l2: float | None = None
        self._sums: dict[str, list[float]] = {}

    def _note(self, key: str, value: float) -> None:
        total = self._sums.setdefault(key, [0.0, 0])
        total[0] += value
        total[1] += 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        use_l2 = self.l2_to_base is not None and self.l2_coef
        if not (use_l2 or self.anchor is not None) or not model.training:
            return out
        loss, outputs = out if return_outputs else (out, None)
        penalty = torch.zeros((), dtype=torch.float32, device=loss.device)
        if use_l2:
            dist = self.l2_to_base()
            penalty = penalty + self.l2_coef * dist
            self.last_l2 = float(dist.detach())
            self._note("l2_to_base", self.last_l2)
        if self.anchor is not None:
            penalty = penalty + self.anchor.spec.kl * self.anchor(model).to(penalty.device)
            self._note("anchor_kl", self.anchor.last)
        scaled_for_ga = self.loss_is_scaled_for_ga
        if scaled_for_ga is None:
            scaled_for_ga = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                or self.compute_loss_func is not None
        if scaled_for_ga:
            penalty = penalty / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        loss = loss + penalty.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        # The logged loss includes the terms; log each term itself beside it (its mean since
        # the last log).
        if "loss" in logs:
            for key, (total, n) in self._sums.items():
                if n:
                    logs[key] = total / n
            self._sums = {}
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------------------------
# Update-norm cap
#
# Implemented with torch optimizer step hooks rather than a TrainerCallback: the pre-hook runs
# right before optimizer.step() and the post-hook right after it, whatever the Trainer does
# around them (gradient accumulation, clipping, the scheduler); a callback's on_step_begin /
# on_step_end bracket more than the step and would need the same parameter snapshot anyway.


class UpdateNormCap:
    """After each optimizer step: delta = w_after - w_before over all trained parameters; if
    ||delta||_2 (global, over every parameter group) > max_norm, set w = w_before + delta *
    max_norm / ||delta||. The optimizer's state (Adam moments) is left as the step made it.
    Costs one copy of the trained parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        self.max_norm = float(max_norm)
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._before: list[torch.Tensor] | None = None
        self.steps = 0
        self.capped_steps = 0
        self.max_seen = 0.0
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    @torch.no_grad()
    def _pre(self, optimizer, args, kwargs) -> None:
        self._before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        if self._before is None:
            return
        deltas = [p - p0 for p, p0 in zip(self.params, self._before)]
        norm = float(torch.sqrt(sum((d.double().pow(2).sum() for d in deltas), torch.zeros((), dtype=torch.float64))))
        self.steps += 1
        self.max_seen = max(self.max_seen, norm)
        if norm > self.max_norm:
            scale = self.max_norm / norm
            for p, p0, d in zip(self.params, self._before, deltas):
                p.copy_(p0 + d * scale)
            self.capped_steps += 1
        self._before = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
