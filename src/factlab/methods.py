"""The training methods factlab offers, as data: what each one trains, whether it merges.

This table imports nothing heavy (no torch, transformers or peft), so the config can validate
`peft.method` against it and check the order of stages before any training code is loaded.
The builders that turn a method into a model to train live in factlab.train.peft_methods,
one per row here (tests/test_peft_methods.py runs every row through its builder).

| method           | trains                                                     | targets | merges |
|------------------|------------------------------------------------------------|---------|--------|
| `lora`           | low-rank B·A per targeted layer, scaled by alpha/r          | yes     | yes    |
| `rslora`         | LoRA scaled by alpha/sqrt(r) (= `lora` with `rslora: true`)  | yes     | yes    |
| `dora`           | LoRA plus a per-row magnitude (= `lora` with `dora: true`)   | yes     | yes    |
| `ia3`            | one scaling vector per targeted layer (IA3)                | yes     | yes    |
| `prompt_tuning`  | `num_virtual_tokens` input embeddings put before the input | no      | no     |
| `prefix_tuning`  | `num_virtual_tokens` keys/values per layer (a KV prefix)    | no      | no     |
| `p_tuning`       | virtual tokens produced by a small MLP (P-tuning)          | no      | no     |
| `full`           | the targeted modules' own weights, no adapter              | yes     | (is the model) |
"""

from __future__ import annotations

from dataclasses import dataclass

from factlab.errors import FactlabError


@dataclass(frozen=True)
class MethodInfo:
    """One training method, described without any of its code."""

    name: str
    merges: bool = True
    """The trained change can be folded into the base weights (a plain transformers model)."""
    wraps: bool = True
    """Training wraps the model in a peft.PeftModel (False: `full` trains the model itself)."""
    targeted: bool = True
    """Uses `peft.targets` / `peft.layers` (prompt methods do not: they touch no layer)."""
    lora_family: bool = False
    """Takes the `rslora` / `dora` switches."""


_METHODS: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> None:
    """Add (or replace) a method's row; its builder registers in factlab.train.peft_methods."""
    _METHODS[info.name] = info


for _info in (
    MethodInfo("lora", lora_family=True),
    MethodInfo("rslora", lora_family=True),
    MethodInfo("dora", lora_family=True),
    MethodInfo("ia3"),
    MethodInfo("prompt_tuning", merges=False, targeted=False),
    MethodInfo("prefix_tuning", merges=False, targeted=False),
    MethodInfo("p_tuning", merges=False, targeted=False),
    MethodInfo("full", wraps=False),
):
    register_method(_info)
del _info


def methods() -> list[str]:
    """Method names, sorted."""
    return sorted(_METHODS)


def lora_family() -> tuple[str, ...]:
    """The methods that take the `rslora` / `dora` switches, in table order."""
    return tuple(m.name for m in _METHODS.values() if m.lora_family)


def method_info(name: str) -> MethodInfo:
    """The row of `name`; FactlabError listing the methods if there is none."""
    if name not in _METHODS:
        raise FactlabError(f"unknown PEFT method '{name}'; use one of: {', '.join(methods())}")
    return _METHODS[name]


def no_merge_reason(name: str) -> str | None:
    """Why a method's result cannot be merged into the weights (None if it can)."""
    if method_info(name).merges:
        return None
    return (f"{name} trains virtual tokens that are added to every input, not a change of weights, "
            "so there is nothing to merge; it is saved and evaluated as base model + adapter")


def check_stage_order(stages) -> None:
    """FactlabError if a stage follows one whose method cannot merge (prompt methods).

    Pure function over StageSpecs, for config-time checks (train_stage checks it again at
    stage time, from the model it is handed).
    """
    for i, st in enumerate(stages[:-1]):
        if not method_info(st.peft.method).merges:
            raise FactlabError(
                f"stages.{i}: method {st.peft.method} cannot merge (it trains virtual tokens, not weights), "
                f"but stage {i + 1} trains on top of it; make it the last stage"
            )
