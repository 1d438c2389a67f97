"""PEFT method builders, one registry entry per method.

A builder takes the (unwrapped) model, the stage's PeftSpec and the resolved targets and returns
a peft.PeftModel. New methods register with `@register("name")`; a failed lookup lists the
methods that exist.
"""

from __future__ import annotations

from typing import Callable

from factlab.errors import FactlabError
from factlab.models.loading import untie_embeddings
from factlab.models.targets import TargetSpec, resolve_targets

Builder = Callable[..., object]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return deco


def methods() -> list[str]:
    return sorted(_REGISTRY)


def build_peft_model(model, spec) -> tuple[object, TargetSpec]:
    """Wrap `model` for training as `spec.method` says. Returns (peft_model, resolved targets)."""
    if spec.method not in _REGISTRY:
        raise FactlabError(f"unknown PEFT method '{spec.method}'; use one of: {', '.join(methods())}")
    targets = resolve_targets(model, list(spec.targets), spec.layers)
    if targets.embed or targets.lm_head:
        # Tied input/output embeddings would make a merged lm_head (or embedding) LoRA change
        # both sides; see untie_embeddings.
        untie_embeddings(model)
    return _REGISTRY[spec.method](model, spec, targets), targets


@register("lora")
def _lora(model, spec, targets: TargetSpec):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_rslora=spec.rslora,
        use_dora=spec.dora,
        target_modules=list(targets.modules),
        fan_in_fan_out=targets.fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)
