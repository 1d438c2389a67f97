"""A training stage's batch builders: `stage_collator` picks, per stage, between padding
(transformers' DataCollatorForSeq2Seq), the distillation collator and FlattenDocuments
(transformers' flattening collator, made to keep documents apart and to pad when that is
cheaper).
"""

from __future__ import annotations

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from factlab.config import StageSpec
from factlab.methods import MethodInfo


def stage_collator(model, tokenizer, stage: StageSpec, method: MethodInfo):
    """The batch builder of a stage.

    CPT with `packing: documents` puts a batch's documents one after the other in a single row
    without padding (transformers' DataCollatorWithFlattening: position ids restart at every
    document, the first token of each gets no label), and the model's attention mask keeps
    every token inside its own document (transformers builds that block-diagonal causal mask
    from the position ids). The step plan and the loss stay those of one padded example per
    document; the compute on padding goes: a batch of short fact documents mixed with full
    replay blocks was mostly padding (measured in the README's step-aware training section).
    A batch whose documents are long enough that one row's attention would cost more than the
    padding pads instead (FlattenDocuments.flattens).

    Everything else pads (DataCollatorForSeq2Seq): SFT, `packing: blocks`, the prompt methods
    (their virtual tokens shift every position), NEFTune (its noise scale depends on the padded
    length), and any model for which flattening_keeps_documents_apart() fails.
    """
    if stage.kind == "distill":
        from factlab.train.distill import DistillCollator

        return DistillCollator(tokenizer)
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    tr = stage.train
    if stage.kind != "cpt" or tr.packing != "documents" or not method.merges or tr.neftune_alpha:
        return padded
    if not flattening_keeps_documents_apart(model):
        return padded
    config = getattr(model, "config", None)
    hidden, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    if not (hidden and layers):
        return FlattenDocuments()
    return FlattenDocuments(padded=padded, token_flops=2 * sum(p.numel() for p in model.parameters()),
                            pair_flops=4 * hidden * layers)


class FlattenDocuments(DataCollatorWithFlattening):
    """transformers' flattening collator, plus `use_cache=False` in every batch: with a KV cache
    (which the models create in training mode too unless told not to) transformers skips the
    packed-sequence mask, and the documents of a row would attend to each other.

    With `padded` (a padding collator) and the model's cost per token and per attended pair of
    positions, each batch goes the cheaper way. Flattening saves the padding but makes one row
    of all the batch's tokens, and the attention of a row is computed (and, for the backward,
    kept) over every pair of its positions, documents apart or not: 8 full blocks of 256
    tokens flattened cost 8x the attention of the padded batch and, on SmolLM2 in fp32, trained
    1.7x as long as the same batches padded (177 vs 106 s for 6 steps in bench/bench_training.py,
    before this choice). Short
    documents of mixed lengths (facts, the recommended recipe) stay flattened; a batch of
    documents that fill seq_len pads. Both give the same loss (tests/test_train.py)."""

    def __init__(self, *args, padded=None, token_flops: float = 0.0, pair_flops: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.padded, self.token_flops, self.pair_flops = padded, token_flops, pair_flops

    def flattens(self, lengths: list[int]) -> bool:
        """Whether a batch of documents of these lengths is cheaper as one flattened row than
        padded: forward FLOPs of the matmuls (per token) plus attention (per pair of positions
        in a row: scores and weighted values)."""
        if self.padded is None:
            return True
        total, longest = sum(lengths), max(lengths)
        flat = total * self.token_flops + total * total * self.pair_flops
        pad = len(lengths) * longest * (self.token_flops + longest * self.pair_flops)
        return flat < pad

    def __call__(self, features, return_tensors=None, separator_id=None):
        if not self.flattens([len(f["input_ids"]) for f in features]):
            return self.padded(features, return_tensors)
        batch = super().__call__(features, return_tensors, separator_id)
        batch["use_cache"] = False
        return batch


def flattening_keeps_documents_apart(model) -> bool:
    """True if `model`, fed a FlattenDocuments batch of two short documents, gives each
    document the logits it gives alone: the attention of this architecture honours the packed
    position ids. Two tiny forward passes in eval mode (dropout off; with use_cache=False the
    mask is built as in training), no gradients."""
    vocab = model.get_input_embeddings().weight.shape[0]
    docs = [[min(i, vocab - 1) for i in (11, 12, 13, 14)], [min(i, vocab - 1) for i in (15, 16, 17)]]
    device = next(model.parameters()).device
    batch = FlattenDocuments()([{"input_ids": d, "labels": d} for d in docs])
    batch.pop("labels")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            together = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).logits[0]
            alone = torch.cat([model(input_ids=torch.tensor([d], device=device), use_cache=False).logits[0]
                               for d in docs])
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(together.float(), alone.float(), atol=1e-3, rtol=1e-3))
