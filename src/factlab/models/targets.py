"""Layer groups: turn what a user writes under `targets:` into the exact module names PEFT adapts.

A user writes groups (`attention`, `mlp`, `lm_head`, `embed`, `all`, `all-but-embed`), explicit
module names (`q_proj`, `mlp.down_proj`, `model.layers.3.self_attn.o_proj`) or a mix, plus an
optional layer range (`layers: 0-11` or `"0,2,5-7"`) that restricts the per-layer modules.
Each architecture describes its layout in one `ArchTable`, registered by `config.model_type`;
explicit names need no table, so they also work for architectures we have never seen.

The result is a `TargetSpec` of full module names, so PEFT's suffix matching can never pick up
an extra module by accident, and only leaf layers PEFT can adapt (Linear, GPT-2's Conv1D,
Embedding) are ever returned.

PEFT caveats (peft 0.21, checked in tests/test_targets.py):

* GPT-2 uses Conv1D, which needs `LoraConfig(fan_in_fan_out=True)`; its `lm_head` is an
  ordinary Linear. With both in one config PEFT warns "fan_in_fan_out is set to True but the
  target module is `torch.nn.Linear`", sets the flag per module correctly, but also flips the
  shared config to False, so adapter_config.json records `fan_in_fan_out: false`. Reloading is
  still right because PEFT re-derives the flag from each module's type.
* LoRA on an Embedding ignores `fan_in_fan_out` (its delta is always transposed), so
  embed + fan_in_fan_out is fine.
* Tied input/output embeddings (SmolLM2, GPT-2, Qwen2, Gemma): a LoRA on `lm_head` or on the
  embedding is merged into the one shared matrix, so the merged model differs from base +
  adapter (also with PEFT's `ensure_weight_tying=True`). Untie first
  (`factlab.train.merge.untie_embeddings`) whenever `spec.embed or spec.lm_head`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from factlab.errors import FactlabError

GROUPS: tuple[str, ...] = ("attention", "mlp", "lm_head", "embed", "all", "all-but-embed")

# What each composite group expands to; the four plain groups map to themselves.
_COMPOSITES: dict[str, tuple[str, ...]] = {
    "all": ("attention", "mlp", "lm_head", "embed"),
    "all-but-embed": ("attention", "mlp", "lm_head"),
}

# Module types PEFT LoRA can adapt and that we are willing to return; never a container.
_LEAF_TYPES = (nn.Linear, nn.Embedding, Conv1D)


@dataclass(frozen=True)
class ArchTable:
    """Where one architecture keeps its layers, in `named_modules()` names."""

    layers_path: str
    """Prefix of the decoder blocks: block i is `f"{layers_path}.{i}"`, e.g. "model.layers"."""
    attention: tuple[str, ...]
    """Leaf names inside a block, e.g. ("self_attn.q_proj", ...)."""
    mlp: tuple[str, ...]
    lm_head: str
    """Full name of the output head, e.g. "lm_head"."""
    embed: str
    """Full name of the input token embedding, e.g. "model.embed_tokens"."""


_TABLES: dict[str, ArchTable] = {}


def register_architecture(model_type: str, table: ArchTable) -> None:
    """Register (or replace) the layer-group table for a `config.model_type`."""
    _TABLES[model_type] = table


def supported_architectures() -> tuple[str, ...]:
    """Model types that have a layer-group table, sorted."""
    return tuple(sorted(_TABLES))


# Llama-style layout: shared by Llama/SmolLM2, Mistral, Qwen2/3, Gemma 1-3, SmolLM3, OLMo 2.
_LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_LIKE = ArchTable("model.layers", _LLAMA_ATTENTION, _LLAMA_MLP, "lm_head", "model.embed_tokens")
for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "smollm3", "olmo2"):
    register_architecture(_t, _LLAMA_LIKE)
del _t

register_architecture("phi3", ArchTable(  # fused qkv and gate/up projections
    "model.layers", ("self_attn.qkv_proj", "self_attn.o_proj"), ("mlp.gate_up_proj", "mlp.down_proj"),
    "lm_head", "model.embed_tokens"))
register_architecture("phi", ArchTable(
    "model.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
    ("mlp.fc1", "mlp.fc2"), "lm_head", "model.embed_tokens"))
register_architecture("gpt2", ArchTable(  # Conv1D layers; position embedding wpe is never a target
    "transformer.h", ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj"),
    "lm_head", "transformer.wte"))
register_architecture("gptj", ArchTable(
    "transformer.h", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"), ("mlp.fc_in", "mlp.fc_out"),
    "lm_head", "transformer.wte"))
register_architecture("gpt_neox", ArchTable(  # the head was `embed_out` before transformers 5
    "gpt_neox.layers", ("attention.query_key_value", "attention.dense"), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "lm_head", "gpt_neox.embed_in"))


def _model_type(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def arch_table(model) -> ArchTable:
    """The layer-group table for `model.config.model_type`; FactlabError if there is none."""
    model_type = _model_type(model)
    table = _TABLES.get(model_type)
    if table is None:
        raise FactlabError(
            f"no layer-group table for model type '{model_type}' (tables exist for {', '.join(supported_architectures())}); "
            "name the modules explicitly in targets (e.g. q_proj, v_proj) or register a table with "
            "factlab.models.targets.register_architecture"
        )
    return table


@dataclass(frozen=True)
class TargetSpec:
    """The resolved targets: what to pass to `peft.LoraConfig`."""

    modules: tuple[str, ...]
    """Sorted full module names, exactly as in `model.named_modules()`."""
    embed: bool
    """The input token embedding is among them."""
    lm_head: bool
    """The output head is among them."""
    fan_in_fan_out: bool
    """Some module is a GPT-2 style Conv1D (pass to LoraConfig(fan_in_fan_out=...))."""


def parse_layers(layers: str | int, n_layers: int) -> tuple[int, ...]:
    """Parse "0-11" / "0,2,5-7" / 3 into sorted layer indices, checked against `n_layers`."""
    text = str(layers).strip()
    indices: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if m is None:
            raise FactlabError(
                f"layers '{text}': cannot read '{part}'; write layer indices and ranges such as 0-11 or 0,2,5-7"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise FactlabError(f"layers '{text}': range '{part}' runs backwards; write it as {hi}-{lo}")
        if hi >= n_layers:
            raise FactlabError(
                f"layers '{text}': layer {hi} is out of range; the model has {n_layers} layers (0-{n_layers - 1})"
            )
        indices.update(range(lo, hi + 1))
    return tuple(sorted(indices))


def _layer_index(name: str, layers_re: re.Pattern) -> int | None:
    m = layers_re.match(name)
    return int(m.group(1)) if m else None


def _layers_regex(table: ArchTable | None) -> re.Pattern:
    if table is not None:
        return re.compile(re.escape(table.layers_path) + r"\.(\d+)\.")
    # No table: in every causal LM we know, the first numeric component of a module name is
    # the decoder block index (model.layers.3..., transformer.h.3..., gpt_neox.layers.3...).
    return re.compile(r"^(?:[^.]+\.)*?(\d+)\.")


def _matches(name: str, wanted: str) -> bool:
    # Whole dotted components only: "proj" must not match "q_proj", "attn" not "self_attn".
    return name == wanted or name.endswith("." + wanted)


def _canonical_group(item: str) -> str | None:
    key = item.strip().lower().replace("_", "-")
    for group in GROUPS:
        if group.replace("_", "-") == key:
            return group
    return None


def _leaf_examples(leaves: dict[str, nn.Module], limit: int = 8) -> str:
    seen: list[str] = []
    for name in leaves:
        last = name.rsplit(".", 1)[-1]
        if last not in seen:
            seen.append(last)
    shown = ", ".join(seen[:limit])
    return shown + (", ..." if len(seen) > limit else "")


def _expand_group(group: str, table: ArchTable, selected: tuple[int, ...],
                  leaves: dict[str, nn.Module], model_type: str | None) -> list[str]:
    names: list[str] = []
    for part in _COMPOSITES.get(group, (group,)):
        if part in ("attention", "mlp"):
            leaf_names = table.attention if part == "attention" else table.mlp
            names += [f"{table.layers_path}.{i}.{leaf}" for i in selected for leaf in leaf_names]
        else:
            names.append(table.lm_head if part == "lm_head" else table.embed)
    # A table that does not fit the model (a variant, or a bad registration) must fail here,
    # by name, rather than as a PEFT error about target modules later.
    missing = [n for n in names if n not in leaves]
    if missing:
        raise FactlabError(
            f"the layer-group table for model type '{model_type}' names {missing[0]}, which this model does not have "
            f"as a Linear/Embedding layer; name the modules explicitly (e.g. {_leaf_examples(leaves, 4)}) "
            "or register a corrected table"
        )
    return names


def resolve_targets(model, targets: list[str], layers: str | int | None = None) -> TargetSpec:
    """Resolve groups and module names (restricted to `layers` when given) into a TargetSpec.

    Groups need the architecture's table; explicit names are matched against the model's leaf
    layers by full name or by trailing dotted components (`q_proj`, `mlp.down_proj`).
    """
    if isinstance(targets, str):  # `targets: attention` in YAML gives a string, not a list
        targets = [targets]
    if not targets:
        raise FactlabError(f"targets is empty; list layer groups or module names, e.g. [attention, mlp] (groups: {', '.join(GROUPS)})")

    # Only leaves PEFT can adapt; named_modules() order is the model's own, kept for messages.
    leaves: dict[str, nn.Module] = {n: m for n, m in model.named_modules() if isinstance(m, _LEAF_TYPES)}
    model_type = _model_type(model)
    table = _TABLES.get(model_type)
    layers_re = _layers_regex(table)
    all_indices = sorted({i for n in leaves if (i := _layer_index(n, layers_re)) is not None})
    n_layers = (max(all_indices) + 1) if all_indices else 0

    if layers is None or (isinstance(layers, str) and not layers.strip()):
        selected = tuple(all_indices)
    elif n_layers == 0:
        raise FactlabError(f"layers '{layers}' given, but no numbered decoder layers were found in this model; remove `layers`")
    else:
        selected = parse_layers(layers, n_layers)
    keep = set(selected)

    chosen: set[str] = set()
    for item in targets:
        if not isinstance(item, str) or not item.strip():
            raise FactlabError(f"targets contains {item!r}; each entry must be a layer group ({', '.join(GROUPS)}) or a module name")
        group = _canonical_group(item)
        if group in ("lm_head", "embed") and table is None:
            # No table, but every transformers causal LM can name its own embedding and head.
            name = _head_name(model) if group == "lm_head" else _embed_name(model)
            if name is None or name not in leaves:
                raise FactlabError(
                    f"layer group '{item}': this model (type '{model_type}') does not expose its "
                    f"{'output head' if group == 'lm_head' else 'input embedding'} as a layer; name the module explicitly"
                )
            chosen.add(name)
            continue
        if group is not None:
            if table is None:
                raise FactlabError(
                    f"layer group '{item}' needs a table for model type '{model_type}', and there is none "
                    f"(tables exist for {', '.join(supported_architectures())}); name the modules explicitly instead, "
                    f"e.g. {_leaf_examples(leaves, 4)}"
                )
            chosen.update(_expand_group(group, table, selected, leaves, model_type))
            continue

        wanted = item.strip()
        hits = [n for n in leaves if _matches(n, wanted)]
        if not hits:
            containers = [n for n, _ in model.named_modules() if n and _matches(n, wanted)]
            if containers:
                # e.g. "self_attn" or GPT-2's "attn": a block of layers, not one layer.
                inside = {n: m for n, m in leaves.items() if n.startswith(containers[0] + ".")}
                raise FactlabError(
                    f"'{wanted}' in targets is a block of layers, not a single layer; use a layer group "
                    f"({', '.join(GROUPS)}) or the layers inside it, such as {_leaf_examples(inside, 6)}"
                )
            raise FactlabError(
                f"unknown layer group or module '{wanted}' in targets; use one of {', '.join(GROUPS)}, "
                f"or a module name such as {_leaf_examples(leaves)}"
            )
        # Per-layer matches obey the layer range; embed/lm_head and other shared layers do not.
        kept = [n for n in hits if (i := _layer_index(n, layers_re)) is None or i in keep]
        if not kept:
            raise FactlabError(
                f"module '{wanted}' in targets is only in layers outside `layers: {layers}`; "
                "widen the layer range or drop the module"
            )
        chosen.update(kept)

    modules = tuple(sorted(chosen))
    embed_name = table.embed if table is not None else _embed_name(model)
    head_name = table.lm_head if table is not None else _head_name(model)
    return TargetSpec(
        modules=modules,
        embed=embed_name in chosen,
        lm_head=head_name in chosen,
        fan_in_fan_out=any(isinstance(leaves[n], Conv1D) for n in modules),
    )


def _name_of(model, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _embed_name(model) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    return _name_of(model, get()) if get else None


def _head_name(model) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    return _name_of(model, get()) if get else None
