"""Saving a trained stage, and merging an adapter into the weights.

What a stage saves, by method (factlab.methods says which method does what):
  lora / rslora / dora / ia3   adapter/ (PEFT) and, with `merge`, merged/ (plain transformers)
  prompt / prefix / p_tuning   adapter/ only: nothing to merge; the model handed on is the
                               PeftModel, so such a stage must be the last one
  full                         merged/ = the trained model itself (no adapter/; `merge` has
                               nothing to do and is ignored)

Merging is exact only when the adapted layers own their weights: a tied input/output
embedding must be untied before an adapter on `embed` or `lm_head` is attached
(`untie_embeddings`, called by factlab.train.peft_methods.build_peft_model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from factlab.errors import FactlabError
from factlab.methods import MethodInfo, no_merge_reason


@dataclass
class SavedStage:
    """What save_trained wrote and the model the next stage starts from."""

    model: object
    """The merged plain model, the fully fine-tuned model, or the PeftModel (not merged)."""
    artifact: str
    """`adapter` (adapter/, PEFT format) or `model` (merged/, full fine-tuning)."""
    artifact_bytes: int
    """Bytes of that artefact as saved (for `model`, without the tokenizer files)."""
    merge_note: str | None
    """Why the stage was not merged; None when merged/ holds base + adapter (or the full model)."""


def untie_embeddings(model) -> bool:
    """Give the output head its own copy of a tied input embedding. Returns True if it was tied.

    Why: with tied weights, merging a LoRA on `lm_head` (or on `embed_tokens`) into the shared
    matrix would change both the input and the output side, so the merged model would not
    equal base + adapter. Untying first keeps the merge exact and the saved model loadable by
    plain transformers (config.tie_word_embeddings is set to False, both matrices are saved).
    """
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return False
    out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_cfg is not None:
        text_cfg.tie_word_embeddings = False
    return True


def folder_bytes(folder: Path, skip: frozenset[str] = frozenset()) -> int:
    """Total size of the files under `folder`, leaving out file names in `skip`."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name not in skip)


def save_adapter(peft_model, folder: Path) -> int:
    """Save the adapter alone in PEFT format; returns its size in bytes.

    save_embedding_layers=False: PEFT would otherwise copy the full embedding / lm_head
    matrices into the adapter whenever they are targeted (~110 MB for SmolLM2); the vocab is
    never resized here, so the LoRA factors alone reproduce the adapter on the base.
    """
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    return folder_bytes(folder)


def save_model(model, tokenizer, folder: Path) -> None:
    """Save a plain transformers model with its tokenizer (loadable by from_pretrained)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def merge_adapter(peft_model, prune: float | None = None):
    """Fold the adapter into the base weights; returns the plain model in eval mode.

    `prune` (a fraction, e.g. 0.08): in every adapted matrix the largest `prune` share of the
    update's entries (by |delta W|) is left out of the merge, the "ignore-top-k" update pruning
    of the Outlandish paper (arXiv 2504.09522), which cut priming (a new name leaking into
    unrelated answers) 50-95% there. Written by hand: PEFT merges the whole delta or nothing.
    LoRA (and rsLoRA) only: a DoRA / IA3 update is not a sum added to the weight."""
    if not prune:
        merged = peft_model.merge_and_unload()
        merged.eval()
        return merged
    from peft.tuners.lora import LoraLayer

    adapter = peft_model.active_adapter
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
    if not layers or any(m.use_dora.get(adapter) for m in layers):
        raise FactlabError("train.prune_updates works on LoRA updates only; remove it or use method lora")
    with torch.no_grad():
        for m in layers:
            delta = m.get_delta_weight(adapter)
            flat = delta.abs().flatten().float()
            k = int(round(prune * flat.numel()))
            if k:
                threshold = flat.kthvalue(flat.numel() - k).values  # the k largest are above it
                delta = torch.where(delta.abs() > threshold, torch.zeros_like(delta), delta)
            base = m.get_base_layer()
            base.weight += delta.to(base.weight.dtype)
    merged = peft_model.unload()  # the adapter layers go, the weights keep the pruned update
    merged.eval()
    return merged


def save_trained(model, tokenizer, method: MethodInfo, merge: bool, folder: Path | None,
                 prune: float | None = None) -> SavedStage:
    """Save a trained stage's model into `folder` (adapter/ and/or merged/) as its method says,
    merging when `merge` and the method can. `model` is what was trained: a PeftModel, or for
    `full` the model itself. `folder` None writes nothing and returns the same model (the
    other processes of a data-parallel launch, which only the first one writes for)."""
    if not method.wraps:
        # Full fine-tuning: the trained model is the result; merged/ holds it (no adapter/).
        for p in model.parameters():
            p.requires_grad_(False)
        size = 0
        if folder is not None:
            model.save_pretrained(folder / "merged")
            size = folder_bytes(folder / "merged")  # before the tokenizer: the model's files only
            tokenizer.save_pretrained(folder / "merged")
        return SavedStage(model, "model", size, None)
    size = save_adapter(model, folder / "adapter") if folder is not None else 0
    note = no_merge_reason(method.name) or (None if merge else "merge: false in the stage")
    if note is not None:
        return SavedStage(model, "adapter", size, note)
    merged = merge_adapter(model, prune)
    if folder is not None:
        save_model(merged, tokenizer, folder / "merged")
    return SavedStage(merged, "adapter", size, None)
