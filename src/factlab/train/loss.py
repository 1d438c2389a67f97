"""The causal-LM training loss without full-vocabulary logits for unlabelled positions.

The model's own loss (transformers' ForCausalLMLoss) applies lm_head to every position and
keeps [batch, seq, vocab] logits, in fp32, their log-softmax and their gradient: for 8 x 256
tokens of SmolLM2 (vocab 49,152) each of those is 403 MB, and in SFT most positions are the
prompt, which has no label at all. The fused path (`train.fused_loss: true`, the default):

  1. the model body's hidden states (the same forward, NEFTune and adapters included);
  2. the positions that have a label after the shift (labels[:, 1:] != -100) are selected;
  3. lm_head, whatever module it is (a Linear, or a LoRA / DoRA / IA3-wrapped one), is applied
     to chunks of those rows inside one autograd Function that computes each chunk's summed
     cross-entropy and, at once, its gradients with respect to the rows and to the head's
     trainable parameters; so only one chunk's logits ever exist, in the forward and in the
     backward, and nothing is recomputed (the flops equal the standard path's);
  4. the sum is divided as the model would (by num_items_in_batch when the Trainer passes it,
     else by the number of labelled tokens).

It is installed as the forward of the transformers model itself (`fused_loss`, a context
manager around training and the held-out evaluation), so every caller keeps working
unchanged: the Trainer's compute_loss, PEFT's wrappers, accelerate/DDP's forward hooks.
A call without labels (generation, scoring) goes to the model's own forward.

Where it cannot apply, the model's own loss is used (`loss_path` says which and why):
prompt / prefix / P-tuning (virtual tokens change the sequence and the labels inside PEFT),
a model without a separate body and head, one whose loss is not the plain causal-LM
cross-entropy, and one whose logits are more than lm_head of the body's output (checked once
per stage on the start of the first example: e.g. Gemma 2's logit soft-capping).
Numerically the two paths differ only by the order of summation (tests: 1e-5 on tiny models);
LoRA dropout on lm_head draws its mask only for labelled rows, so with dropout > 0 there the
noise (not its distribution) differs from the standard path.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

IGNORE_INDEX = -100

CHUNK_ELEMENTS = 1 << 22
"""Logits per chunk (4 Mi: 16 MB in fp32, 85 rows at SmolLM2's vocabulary of 49,152): small
enough for glibc to serve from its heap (from 32 MB on it maps fresh, page-faulting memory for
every allocation), large enough for an efficient matmul."""


@dataclass(frozen=True)
class LossPath:
    """Which loss a stage trains with: `fused` (see the module docstring) or `standard` (the
    model's own), and why the standard one when it is."""

    name: str
    reason: str | None = None


def hf_model(model):
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def body_and_head(hf):
    body = getattr(hf, "base_model", None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if body is None or body is hf or head is None:
        return None, None
    return body, head


def loss_path(model, enabled: bool = True, check_ids: torch.Tensor | None = None) -> LossPath:
    """Decide the loss path of `model` (a PeftModel, or the model for full fine-tuning).

    `check_ids` (1, T): a short input on which the model's logits must be exactly lm_head of
    its body's output (see _logits_are_head_of_body); without it that check is skipped.
    """
    if not enabled:
        return LossPath("standard", "train.fused_loss is false")
    cfg = getattr(model, "active_peft_config", None)
    if cfg is not None and getattr(cfg, "is_prompt_learning", False):
        kind = str(cfg.peft_type.value).lower()
        return LossPath("standard", f"{kind} adds virtual tokens inside PEFT's forward")
    hf = hf_model(model)
    body, head = body_and_head(hf)
    if body is None:
        return LossPath("standard", f"{type(hf).__name__} has no separate body and output head")
    if getattr(hf, "loss_function", None) is not ForCausalLMLoss:
        return LossPath("standard", f"{type(hf).__name__}'s loss is not the plain causal-LM cross-entropy")
    if getattr(hf.config, "output_router_logits", False):
        return LossPath("standard", "the model adds a router auxiliary loss")
    if check_ids is not None and not _logits_are_head_of_body(model, body, head, check_ids):
        return LossPath("standard", f"{type(hf).__name__} does more than apply lm_head to its body's output "
                                    "(e.g. logit soft-capping or scaling)")
    return LossPath("fused")


def _logits_are_head_of_body(model, body, head, ids: torch.Tensor) -> bool:
    """Run `model` once on `ids` with lm_head's output replaced by large random logits: the
    model must return exactly those (nothing between head and logits: no soft-capping, no
    scaling), and lm_head's input must be what the body returns. Eval mode, no autocast; the
    global RNG is not touched."""
    seen: dict[str, torch.Tensor] = {}

    def replace(module, args, output):
        gen = torch.Generator().manual_seed(0)
        seen["input"] = args[0].detach()
        seen["logits"] = (30 * torch.randn(output.shape, generator=gen)).to(device=output.device, dtype=output.dtype)
        return seen["logits"]

    was_training = model.training
    model.eval()
    handle = head.register_forward_hook(replace)
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            ids = ids.to(head.weight.device)
            logits = model(input_ids=ids).logits
            handle.remove()
            hidden = body(input_ids=ids, use_cache=False)[0]
    finally:
        handle.remove()
        model.train(was_training)
    return (logits is not None and logits.shape == seen["logits"].shape and torch.equal(logits.to(seen["logits"].dtype), seen["logits"])
            and hidden.shape == seen["input"].shape and torch.allclose(hidden, seen["input"], rtol=1e-5, atol=1e-6))


@contextmanager
def fused_loss(model, chunk_rows: int | None = None):
    """Within the block, a forward of `model` given labels returns the fused loss (and no
    logits). `chunk_rows`: head rows per chunk (default: CHUNK_ELEMENTS / vocabulary).

    If something wraps the model's forward meanwhile (accelerate wraps the forward of the model
    the Trainer trains in autocast; without PEFT that is this very model), the wrapper is left
    in place at the end and the fused forward inside it passes every call on unchanged."""
    hf = hf_model(model)
    body, head = body_and_head(hf)
    if body is None:
        raise ValueError(f"{type(hf).__name__} has no separate body and output head")
    previous = vars(hf).get("forward")  # an instance-level forward already there, if any
    original = hf.forward
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // max(1, head.weight.shape[0]))
    active = True

    def forward(*args, labels=None, num_items_in_batch=None, **kwargs):
        if (not active or labels is None or args or kwargs.get("past_key_values") is not None
                or "logits_to_keep" in kwargs):
            return original(*args, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        kwargs.pop("return_dict", None)
        hidden = body(**kwargs)[0]
        return CausalLMOutputWithPast(loss=causal_lm_loss(head, hidden, labels, num_items_in_batch, rows))

    hf.forward = forward
    try:
        yield
    finally:
        if vars(hf).get("forward") is forward:
            if previous is None:
                del hf.forward  # back to the class's forward
            else:
                hf.forward = previous
        else:
            active = False


def causal_lm_loss(head, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None,
                   chunk_rows: int = 256) -> torch.Tensor:
    """ForCausalLMLoss(head(hidden), labels) without the logits of unlabelled positions and
    never more than `chunk_rows` rows of logits at once. hidden (B, T, H), labels (B, T)."""
    shift = labels[:, 1:].to(hidden.device)
    keep = shift != IGNORE_INDEX
    rows = hidden[:, :-1][keep]  # (N, H)
    targets = shift[keep]  # (N,)
    params = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (rows.requires_grad or params):
        total = ChunkedHeadLoss.apply(rows, _cross_entropy_of(targets), head, chunk_rows, *params)
    else:
        total = _chunked_sum(head, rows, targets, chunk_rows)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / targets.numel()  # a mean (NaN without labels, as cross_entropy's mean)


def _chunked_sum(head, rows: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], chunk_rows):
        logits = head(rows[start:start + chunk_rows]).float()
        total = total + F.cross_entropy(logits, targets[start:start + chunk_rows], reduction="sum")
    return total


def _cross_entropy_of(targets: torch.Tensor):
    def chunk_loss(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return F.cross_entropy(logits, targets[start:end], reduction="sum")
    return chunk_loss


class ChunkedHeadLoss(torch.autograd.Function):
    """sum over row chunks of chunk_loss(head(rows[s:e]).float(), s, e), with the gradients
    computed chunk by chunk in the forward and scaled by the incoming gradient in the backward,
    so only one chunk's logits exist at a time. `chunk_loss` is the causal-LM cross-entropy
    (causal_lm_loss) or the KL to the base model (factlab.train.anchor).

    Written by hand because autograd would keep every chunk's logits (and their softmax) alive
    until the backward; torch has no chunked-head loss for an arbitrary head module."""

    @staticmethod
    def forward(ctx, rows, chunk_loss, head, chunk_rows, *params):
        want_rows = ctx.needs_input_grad[0]
        want = [i for i, p in enumerate(params) if ctx.needs_input_grad[4 + i]]
        grad_rows = torch.zeros_like(rows) if want_rows else None
        grad_params = [torch.zeros_like(p) if i in want else None for i, p in enumerate(params)]
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], chunk_rows):
            end = min(rows.shape[0], start + chunk_rows)
            piece = rows[start:end].detach().requires_grad_(want_rows)
            with torch.enable_grad():
                loss = chunk_loss(head(piece).float(), start, end)
            wrt = ([piece] if want_rows else []) + [params[i] for i in want]
            if wrt:
                grads = torch.autograd.grad(loss, wrt, allow_unused=True)
                if want_rows:
                    grad_rows[start:end] = grads[0]
                    grads = grads[1:]
                for i, g in zip(want, grads):
                    if g is not None:
                        grad_params[i] += g
            total += loss.detach()
        ctx.grad_rows, ctx.grad_params = grad_rows, grad_params
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_rows = ctx.grad_rows * grad_total.to(ctx.grad_rows.dtype) if ctx.grad_rows is not None else None
        grad_params = [g * grad_total.to(g.dtype) if g is not None else None for g in ctx.grad_params]
        ctx.grad_rows = ctx.grad_params = None
        return (grad_rows, None, None, None, *grad_params)


# ---------------------------------------------------------------------------------------
# KL between a fixed reference distribution and the model's (the anchor, self-distillation):
# the reference kept as its top k log-probabilities and the log of the rest's mass.


def topk_targets(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Teacher logits (N, V) -> (log-probs (N, k) float32, token ids (N, k) int64, log tail
    mass (N,) float32; -inf when k covers the vocabulary), at `temperature`."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    k = min(k, logp.shape[-1])
    top, idx = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)  # exact: the log of the rest's mass
    return top, idx, tail


def topk_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_idx: torch.Tensor,
            teacher_tail: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row KL_k(p_teacher || p_student) of the k teacher tokens plus one tail bucket
    (module docstring), times temperature^2 (Hinton et al.: keeps the gradient's scale).
    student_logits (N, V); teacher_logp, teacher_idx (N, k); teacher_tail (N,) -> (N,)."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    q_top = logq.gather(-1, teacher_idx)  # (N, k)
    has_tail = teacher_tail > float("-inf")  # (N,)
    # the student's tail: its mass outside the teacher's k tokens; rows without a teacher
    # tail get a finite dummy so that no inf/nan reaches the gradient
    rest = logq.scatter(-1, teacher_idx, float("-inf"))
    q_tail = torch.where(has_tail[:, None], rest, torch.zeros_like(rest)).logsumexp(-1)
    p_top = teacher_logp.exp()
    t_tail = torch.where(has_tail, teacher_tail, torch.zeros_like(teacher_tail))
    tail_term = torch.where(has_tail, t_tail.exp() * (t_tail - q_tail), torch.zeros_like(q_tail))
    return ((p_top * (teacher_logp - q_top)).sum(-1) + tail_term) * temperature ** 2


def full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row KL(p_teacher || p_student) over the whole vocabulary (the reference), (N,)."""
    logp = F.log_softmax(teacher_logits.float() / temperature, -1)
    logq = F.log_softmax(student_logits.float() / temperature, -1)
    return (logp.exp() * (logp - logq)).sum(-1) * temperature ** 2
