"""PEFT method builders: one function per row of the method table (factlab.methods).

A builder takes the (unwrapped) model, the stage's PeftSpec and the resolved targets and returns
the model to train: a `peft.PeftModel` for the PEFT families, the model itself for `full`.
A new method adds its row with `factlab.methods.register_method` and its builder here with
`@register("name")`; what a method trains and whether it merges is in factlab.methods
(tests/test_peft_methods.py runs every row of that table through its builder).

Bottleneck adapters (Houlsby / Pfeiffer) are not offered: peft has none, and the library that
does (`adapters` 1.3) pins transformers ~=4.57, which conflicts with transformers 5.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from transformers.pytorch_utils import Conv1D

from factlab.errors import FactlabError
from factlab.methods import method_info
from factlab.models.targets import TargetSpec, arch_table, resolve_targets
from factlab.train.merge import untie_embeddings

Builder = Callable[..., object]
"""build(model, spec, targets) -> the model to train (PeftModel, or the model for `full`)."""

_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: the builder of method `name`, which must have a row in factlab.methods."""
    method_info(name)  # FactlabError naming the methods if the row is missing

    def deco(fn: Builder) -> Builder:
        _BUILDERS[name] = fn
        return fn

    return deco


def _empty_targets() -> TargetSpec:
    return TargetSpec(modules=(), embed=False, lm_head=False, fan_in_fan_out=False)


def build_peft_model(model, spec) -> tuple[object, TargetSpec]:
    """Wrap `model` for training as `spec.method` says. Returns (model to train, resolved targets).

    Targeted methods resolve layer groups to module names first, and untie tied input/output
    embeddings when `embed` or `lm_head` is among them (see untie_embeddings). Prompt methods
    resolve nothing and leave the model as it is (their TargetSpec is empty).
    """
    info = method_info(spec.method)
    build = _BUILDERS[info.name]
    if not info.targeted:
        return build(model, spec, _empty_targets()), _empty_targets()
    targets = resolve_targets(model, list(spec.targets), spec.layers)
    if targets.embed or targets.lm_head:
        # Tied input/output embeddings would make a merged lm_head (or embedding) change
        # both sides; see untie_embeddings.
        untie_embeddings(model)
    return build(model, spec, targets), targets


def is_peft_model(model) -> bool:
    """True for a peft.PeftModel (duck-typed: also PEFT's task-specific subclasses)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


# ---------------------------------------------------------------------------------------
# LoRA family


def _lora_config(spec, targets, *, rslora: bool, dora: bool):
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_rslora=rslora,
        use_dora=dora,
        target_modules=list(targets.modules),
        fan_in_fan_out=targets.fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _check_dora_rows(model, targets) -> None:
    """DoRA divides by the norm of every output row of W (+ the LoRA delta, zero at start); an
    all-zero row, such as the padding token's row of a tied lm_head, gives 0/0 = NaN in PEFT's
    forward. Fail with a clear message instead of a NaN loss."""
    named = dict(model.named_modules())
    with torch.no_grad():
        for name in targets.modules:
            mod = named[name]
            w = mod.weight.t() if isinstance(mod, Conv1D) else mod.weight  # (out, in)
            zero = int((w.norm(dim=1) == 0).sum()) if isinstance(mod, (torch.nn.Linear, Conv1D)) else 0
            if zero:
                raise FactlabError(
                    f"dora: {name} has {zero} all-zero output row(s) (e.g. a padding token's row), which DoRA's "
                    "per-row normalisation turns into NaN; drop it from peft.targets or use lora"
                )


def _lora_family(model, spec, targets, *, rslora: bool, dora: bool):
    if dora:
        _check_dora_rows(model, targets)
    return get_peft_model(model, _lora_config(spec, targets, rslora=rslora, dora=dora))


@register("lora")
def _lora(model, spec, targets):
    return _lora_family(model, spec, targets, rslora=spec.rslora, dora=spec.dora)


@register("rslora")
def _rslora(model, spec, targets):
    return _lora_family(model, spec, targets, rslora=True, dora=spec.dora)


@register("dora")
def _dora(model, spec, targets):
    return _lora_family(model, spec, targets, rslora=spec.rslora, dora=True)


# ---------------------------------------------------------------------------------------
# IA3


def _is_mlp_module(model, name: str) -> bool:
    try:
        return any(name.endswith("." + leaf) for leaf in arch_table(model).mlp)
    except FactlabError:  # no layer-group table for this architecture: go by the name
        return ".mlp." in f".{name}."


@register("ia3")
def _ia3(model, spec, targets):
    """IA3 on the targeted Linear layers. Layers of the `mlp` group are IA3 "feedforward"
    modules (their input is scaled, as the paper scales the FFN activation); all others have
    their output scaled (the paper's keys and values). The paper's exact recipe is
    `targets: [k_proj, v_proj, down_proj]`."""
    if targets.embed:
        raise FactlabError("ia3 cannot adapt the input embedding (peft IA3 supports Linear layers only); "
                           "drop `embed` from peft.targets")
    modules = list(targets.modules)
    feedforward = [m for m in modules if _is_mlp_module(model, m)]
    cfg = IA3Config(target_modules=modules, feedforward_modules=feedforward,
                    fan_in_fan_out=targets.fan_in_fan_out, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


# ---------------------------------------------------------------------------------------
# Prompt methods: virtual tokens, nothing to merge


@register("prompt_tuning")
def _prompt_tuning(model, spec, targets):
    """Initialised from the embeddings of randomly drawn vocabulary tokens (PEFT's
    SAMPLE_VOCAB), so the virtual tokens start at the scale of real ones."""
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.num_virtual_tokens,
                             prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    return get_peft_model(model, cfg)


@register("prefix_tuning")
def _prefix_tuning(model, spec, targets):
    """Without the reparameterisation MLP (`prefix_projection=False`, PEFT's default), and
    initialised from real tokens (see init_prefix_from_tokens)."""
    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.num_virtual_tokens)
    peft_model = get_peft_model(model, cfg)
    vocab = model.get_input_embeddings().num_embeddings
    init_prefix_from_tokens(peft_model, torch.randint(0, vocab, (spec.num_virtual_tokens,)))
    return peft_model


def init_prefix_from_tokens(peft_model, token_ids) -> bool:
    """Set a prefix-tuning adapter to the keys/values the base model computes for `token_ids`
    (n_virtual,), so that it starts as if those tokens preceded every input.

    Why: PEFT initialises the prefix with N(0, 1) keys and values, far from the scale of
    real ones; on SmolLM2-135M that about doubles the loss on the Korrin documents before any
    training, and a few hundred steps do not recover it. From real tokens (Li & Liang 2021,
    "initializing the prefix with activations of real words") it starts close to the base loss.
    The layout PEFT reads back (PeftModel.get_prompt): row t of the prefix embedding is
    [layer 0 key, layer 0 value, layer 1 key, ...], each (kv_heads * head_dim) for token t.
    Returns False (PEFT's initialisation kept, with a warning) for a cache of another layout.
    """
    cfg = peft_model.active_peft_config
    weight = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight  # (n, 2 * layers * kv_dim)
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=weight.device).view(1, -1)  # (1, n)
    base = peft_model.get_base_model()
    with torch.no_grad():
        cache = base(input_ids=ids, use_cache=True).past_key_values
        layers = getattr(cache, "layers", None)
        if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
            warnings.warn("prefix_tuning: unexpected cache layout; keeping PEFT's random prefix initialisation")
            return False
        kv = torch.stack([t for layer in layers for t in (layer.keys, layer.values)])  # (2L, 1, H, n, D)
        kv = kv[:, 0].permute(2, 0, 1, 3).reshape(ids.shape[1], -1)  # (n, 2L * H * D)
        if kv.shape != weight.shape or cfg.num_transformer_submodules != 1:
            warnings.warn("prefix_tuning: prefix shape does not match the model's cache; keeping PEFT's random init")
            return False
        weight.copy_(kv.to(weight.dtype))
    return True


@register("p_tuning")
def _p_tuning(model, spec, targets):
    """PEFT's PromptEncoder with its MLP reparameterisation (hidden size = the model's)."""
    cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.num_virtual_tokens)
    return get_peft_model(model, cfg)


def align_virtual_token_logits(peft_model):
    """Make a prompt-tuning / P-tuning PeftModel index its logits like `input_ids`.

    PEFT puts the virtual tokens before the input embeddings, and the base model then sees
    n_virtual + T positions: `logits` is (B, n_virtual + T, V), and a tensor
    `logits_to_keep` (positions) counts the virtual tokens too. Every consumer in factlab
    (perplexity, scoring) reads position t as the prediction after input token t, as for a
    plain model (prefix tuning already behaves so). Two hooks on the PeftModel:
      * before the forward, positions given as a tensor `logits_to_keep` are shifted by
        n_virtual (an int `logits_to_keep` counts from the end and needs nothing);
      * after it, the first n_virtual positions are dropped when, and only when, the logits
        are exactly that much longer than the input.
    The loss (computed inside the base model on labels PEFT pads) is untouched. Returns the
    hook handles (empty for other methods).
    """
    cfg = getattr(peft_model, "active_peft_config", None)
    if cfg is None or not getattr(cfg, "is_prompt_learning", False) or cfg.peft_type.value == "PREFIX_TUNING":
        return []
    n_virtual = cfg.num_virtual_tokens * getattr(cfg, "num_transformer_submodules", 1)

    def before(module, args, kwargs):
        keep = kwargs.get("logits_to_keep")
        if isinstance(keep, torch.Tensor):
            kwargs = {**kwargs, "logits_to_keep": keep + n_virtual}
        return args, kwargs

    def after(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        length = ids.shape[1] if ids is not None else (emb.shape[1] if emb is not None else None)
        logits = getattr(output, "logits", None)
        if length is not None and logits is not None and logits.shape[1] == length + n_virtual:
            output.logits = logits[:, n_virtual:]
        return output

    return [peft_model.register_forward_pre_hook(before, with_kwargs=True),
            peft_model.register_forward_hook(after, with_kwargs=True)]


# ---------------------------------------------------------------------------------------
# Full fine-tuning


@register("full")
def _full(model, spec, targets):
    """Full fine-tuning without a PEFT wrapper: every parameter (weight and bias) of the
    targeted modules trains, all others are frozen. The group `all` (without `layers`) means
    every parameter of the model, norms and position embeddings too; other groups, module
    names and `layers` mean the parameters of those layers (so the default `all-but-embed`
    trains the attention, MLP and lm_head matrices and leaves norms and the input embedding
    frozen). `r`, `alpha` and `dropout` are not used."""
    wanted = set(targets.modules)
    everything = "all" in {t.strip().lower() for t in spec.targets} and not spec.layers
    for p in model.parameters():
        p.requires_grad_(everything)
    if not everything:
        for name, mod in model.named_modules():
            if name in wanted:
                for p in mod.parameters():
                    p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise FactlabError("method full: the targets select no parameters; name layer groups or modules in peft.targets")
    return model
