"""Layer groups -> module names, on tiny random models of every architecture we have a table for."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from factlab.errors import FactlabError
from factlab.models import targets as T
from factlab.models.targets import GROUPS, ArchTable, TargetSpec, arch_table, register_architecture, resolve_targets
from factlab.testing import TINY_ARCHITECTURES, tiny_model

# PEFT's tied-embedding and fan_in_fan_out warnings are expected here (see the module docstring).
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),  # inside PEFT
]


def _per_layer(prefix: str, leaves: list[str], layers=(0, 1)) -> list[str]:
    return [f"{prefix}.{i}.{leaf}" for i in layers for leaf in leaves]


# Expected names written out literally (2-layer tiny models); sorted() only orders them.
EXPECTED = {
    "llama": {
        "attention": [
            "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
            "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj",
            "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
        ],
        "mlp": [
            "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
            "model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
        ],
        "lm_head": ["lm_head"],
        "embed": ["model.embed_tokens"],
    },
    "phi3": {
        "attention": [
            "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.qkv_proj",
            "model.layers.1.self_attn.o_proj", "model.layers.1.self_attn.qkv_proj",
        ],
        "mlp": [
            "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_up_proj",
            "model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_up_proj",
        ],
        "lm_head": ["lm_head"],
        "embed": ["model.embed_tokens"],
    },
    "gpt2": {
        "attention": [
            "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
            "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
        ],
        "mlp": [
            "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
            "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj",
        ],
        "lm_head": ["lm_head"],
        "embed": ["transformer.wte"],
    },
    "gpt_neox": {
        "attention": [
            "gpt_neox.layers.0.attention.dense", "gpt_neox.layers.0.attention.query_key_value",
            "gpt_neox.layers.1.attention.dense", "gpt_neox.layers.1.attention.query_key_value",
        ],
        "mlp": [
            "gpt_neox.layers.0.mlp.dense_4h_to_h", "gpt_neox.layers.0.mlp.dense_h_to_4h",
            "gpt_neox.layers.1.mlp.dense_4h_to_h", "gpt_neox.layers.1.mlp.dense_h_to_4h",
        ],
        "lm_head": ["lm_head"],
        "embed": ["gpt_neox.embed_in"],
    },
}

# Architectures without tiny_model() support: tiny kwargs for AutoConfig.for_model.
_LLAMA_LIKE_KW = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXTRA = {
    "mistral": _LLAMA_LIKE_KW,
    "qwen3": _LLAMA_LIKE_KW,
    "gemma2": _LLAMA_LIKE_KW,
    "gemma3_text": _LLAMA_LIKE_KW,
    "smollm3": _LLAMA_LIKE_KW,
    "olmo2": _LLAMA_LIKE_KW,
    "phi": dict(_LLAMA_LIKE_KW, num_key_value_heads=4, head_dim=None),
}

# (attention per layer, mlp per layer, a per-layer attention leaf, embed name) for count checks.
SHAPES = {
    "qwen2": (4, 3, "self_attn.q_proj", "model.embed_tokens"),
    "gemma": (4, 3, "self_attn.q_proj", "model.embed_tokens"),
    "gptj": (4, 2, "attn.out_proj", "transformer.wte"),
    "mistral": (4, 3, "self_attn.q_proj", "model.embed_tokens"),
    "qwen3": (4, 3, "self_attn.q_proj", "model.embed_tokens"),
    "gemma2": (4, 3, "self_attn.q_proj", "model.embed_tokens"),
    "gemma3_text": (4, 3, "self_attn.q_proj", "model.embed_tokens"),
    "smollm3": (4, 3, "self_attn.q_proj", "model.embed_tokens"),
    "olmo2": (4, 3, "self_attn.q_proj", "model.embed_tokens"),
    "phi": (4, 2, "self_attn.dense", "model.embed_tokens"),
}

ALL_ARCHS = TINY_ARCHITECTURES + tuple(EXTRA)


def build(model_type: str):
    """A 2-layer tiny random model of any architecture in ALL_ARCHS."""
    if model_type in TINY_ARCHITECTURES:
        return tiny_model(model_type)
    kwargs = {k: v for k, v in EXTRA[model_type].items() if v is not None}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=400, **kwargs)).eval()


@pytest.fixture(scope="module")
def models():
    """Each architecture built once per module; tests that mutate a model build their own."""
    cache: dict[str, nn.Module] = {}

    def get(model_type: str):
        if model_type not in cache:
            cache[model_type] = build(model_type)
        return cache[model_type]

    return get


# ---------------------------------------------------------------- groups per architecture


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
@pytest.mark.parametrize("group", ["attention", "mlp", "lm_head", "embed"])
def test_group_names_exact(models, model_type, group):
    spec = resolve_targets(models(model_type), [group])
    assert spec.modules == tuple(sorted(EXPECTED[model_type][group]))
    assert spec.embed == (group == "embed")
    assert spec.lm_head == (group == "lm_head")


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_composite_groups_exact(models, model_type):
    exp = EXPECTED[model_type]
    model = models(model_type)
    all_ = resolve_targets(model, ["all"])
    assert all_.modules == tuple(sorted(exp["attention"] + exp["mlp"] + exp["lm_head"] + exp["embed"]))
    assert all_.embed and all_.lm_head
    but = resolve_targets(model, ["all-but-embed"])
    assert but.modules == tuple(sorted(exp["attention"] + exp["mlp"] + exp["lm_head"]))
    assert not but.embed and but.lm_head


@pytest.mark.parametrize("model_type", sorted(SHAPES))
def test_group_counts_and_names(models, model_type):
    n_attn, n_mlp, attn_leaf, embed = SHAPES[model_type]
    model = models(model_type)
    prefix = arch_table(model).layers_path
    attn = resolve_targets(model, ["attention"]).modules
    mlp = resolve_targets(model, ["mlp"]).modules
    assert len(attn) == 2 * n_attn and len(mlp) == 2 * n_mlp
    assert f"{prefix}.1.{attn_leaf}" in attn
    assert all(".mlp." in n for n in mlp)
    assert resolve_targets(model, ["embed"]).modules == (embed,)
    assert resolve_targets(model, ["lm_head"]).modules == ("lm_head",)
    assert len(resolve_targets(model, ["all"]).modules) == 2 * (n_attn + n_mlp) + 2


@pytest.mark.parametrize("model_type", ALL_ARCHS)
def test_only_adaptable_leaves_and_flag(models, model_type):
    model = models(model_type)
    spec = resolve_targets(model, ["all"])
    mods = dict(model.named_modules())
    assert all(isinstance(mods[n], (nn.Linear, nn.Embedding, Conv1D)) for n in spec.modules)
    assert spec.modules == tuple(sorted(spec.modules))
    assert spec.fan_in_fan_out == (model_type == "gpt2")


def test_groups_constant():
    assert GROUPS == ("attention", "mlp", "lm_head", "embed", "all", "all-but-embed")


# ---------------------------------------------------------------- layer ranges


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_layer_one_only(models, model_type):
    model = models(model_type)
    spec = resolve_targets(model, ["all"], layers="1")
    prefix = arch_table(model).layers_path
    per_layer = [n for n in spec.modules if n.startswith(prefix + ".")]
    assert per_layer and all(n.startswith(f"{prefix}.1.") for n in per_layer)
    exp = EXPECTED[model_type]
    assert per_layer == sorted(n for n in exp["attention"] + exp["mlp"] if n.startswith(f"{prefix}.1."))
    # embed and lm_head are not per-layer: a layer range never removes them
    assert spec.embed and spec.lm_head


@pytest.mark.parametrize("layers", ["0-1", "0,1", " 0 - 1 ", "1,0-1"])
def test_full_range_equals_no_restriction(models, layers):
    model = models("llama")
    assert resolve_targets(model, ["all"], layers=layers) == resolve_targets(model, ["all"])


def test_layers_as_int_and_mixed_list(models):
    model = models("llama")
    assert resolve_targets(model, ["attention"], layers=1) == resolve_targets(model, ["attention"], layers="1")
    assert T.parse_layers("0,2,5-7", 12) == (0, 2, 5, 6, 7)
    assert T.parse_layers("3-3", 4) == (3,)


def test_layers_restrict_explicit_names(models):
    spec = resolve_targets(models("llama"), ["q_proj", "lm_head"], layers="0")
    assert spec.modules == ("lm_head", "model.layers.0.self_attn.q_proj")


# ---------------------------------------------------------------- explicit names


def test_explicit_leaf_suffix_and_full_names(models):
    model = models("llama")
    assert resolve_targets(model, ["q_proj"]).modules == (
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")
    assert resolve_targets(model, ["mlp.down_proj"]).modules == (
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    assert resolve_targets(model, ["model.layers.1.self_attn.o_proj"]).modules == ("model.layers.1.self_attn.o_proj",)
    assert resolve_targets(model, ["embed_tokens"]).embed


def test_mixed_groups_and_names_dedupe(models):
    model = models("llama")
    spec = resolve_targets(model, ["attention", "q_proj", "mlp.up_proj"])
    assert spec.modules == tuple(sorted(EXPECTED["llama"]["attention"] + [
        "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]))


def test_group_spelling_is_forgiving(models):
    model = models("llama")
    assert resolve_targets(model, ["Attention"]) == resolve_targets(model, ["attention"])
    assert resolve_targets(model, ["all_but_embed"]) == resolve_targets(model, ["all-but-embed"])
    assert resolve_targets(model, "mlp") == resolve_targets(model, ["mlp"])  # YAML scalar


def test_gpt2_fan_in_fan_out_follows_selected_modules(models):
    model = models("gpt2")
    assert resolve_targets(model, ["attention"]).fan_in_fan_out
    assert not resolve_targets(model, ["embed", "lm_head"]).fan_in_fan_out


def test_unknown_architecture_explicit_names_work():
    model = tiny_model("gpt2")
    model.config.model_type = "not_a_real_arch"
    spec = resolve_targets(model, ["c_attn", "lm_head", "embed"], layers="1")
    assert spec == TargetSpec(("lm_head", "transformer.h.1.attn.c_attn", "transformer.wte"),
                              embed=True, lm_head=True, fan_in_fan_out=True)
    with pytest.raises(FactlabError, match="not_a_real_arch.*explicitly"):
        resolve_targets(model, ["attention"])
    with pytest.raises(FactlabError, match="no layer-group table for model type 'not_a_real_arch'.*llama"):
        arch_table(model)


def test_register_architecture(monkeypatch):
    model = tiny_model("llama")
    model.config.model_type = "my_llama"
    monkeypatch.setitem(T._TABLES, "my_llama", None)  # restores the registry after the test
    register_architecture("my_llama", ArchTable("model.layers", ("self_attn.q_proj",), ("mlp.up_proj",),
                                                 "lm_head", "model.embed_tokens"))
    assert resolve_targets(model, ["all-but-embed"], layers="0").modules == (
        "lm_head", "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj")
    # a table naming modules the model lacks fails here, by name, not later inside PEFT
    register_architecture("my_llama", ArchTable("model.layers", ("attn.wq",), (), "lm_head", "model.embed_tokens"))
    with pytest.raises(FactlabError, match=r"model.layers.0.attn.wq"):
        resolve_targets(model, ["attention"])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", ["mlps", "attn", "proj", "layers"])
def test_unknown_group_or_module(models, bad):
    with pytest.raises(FactlabError) as e:
        resolve_targets(models("llama"), ["attention", bad])
    msg = str(e.value)
    assert f"'{bad}'" in msg and "attention, mlp, lm_head, embed, all, all-but-embed" in msg
    assert "\n" not in msg


def test_unknown_module_lists_available_leaves(models):
    msg = str(pytest.raises(FactlabError, resolve_targets, models("llama"), ["mlps"]).value)
    assert msg.startswith("unknown layer group or module 'mlps' in targets")
    assert "q_proj" in msg and "down_proj" in msg


def test_container_name_is_explained(models):
    # GPT-2's "attn" is a block holding c_attn and c_proj, not one layer
    msg = str(pytest.raises(FactlabError, resolve_targets, models("gpt2"), ["attn"]).value)
    assert "'attn'" in msg and "c_attn" in msg and "c_proj" in msg


@pytest.mark.parametrize("targets", [[], ["attention", ""], ["attention", None]])
def test_empty_targets(models, targets):
    with pytest.raises(FactlabError, match="targets"):
        resolve_targets(models("llama"), targets)


@pytest.mark.parametrize("layers, needle", [
    ("a", "'a'"), ("0-", "'0-'"), ("1,,0", "''"), ("-1", "'-1'"), ("1-0", "'1-0'"),
])
def test_bad_layer_range(models, layers, needle):
    with pytest.raises(FactlabError) as e:
        resolve_targets(models("llama"), ["attention"], layers=layers)
    assert needle in str(e.value) and f"layers '{layers.strip()}'" in str(e.value)


@pytest.mark.parametrize("layers, index", [("2", 2), ("0-5", 5), ("0,1,7", 7)])
def test_out_of_range_layer(models, layers, index):
    with pytest.raises(FactlabError, match=rf"layer {index} is out of range; the model has 2 layers \(0-1\)"):
        resolve_targets(models("llama"), ["mlp"], layers=layers)


def test_explicit_full_name_outside_layer_range(models):
    with pytest.raises(FactlabError, match=r"model.layers.0.mlp.up_proj.*outside `layers: 1`"):
        resolve_targets(models("llama"), ["model.layers.0.mlp.up_proj"], layers="1")


# ---------------------------------------------------------------- PEFT


def _lora_names(peft_model) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("model_type", ALL_ARCHS)
def test_peft_wraps_all(model_type):
    model = build(model_type)  # fresh: get_peft_model modifies the model in place
    spec = resolve_targets(model, ["all"])
    config = peft.LoraConfig(r=2, target_modules=list(spec.modules), fan_in_fan_out=spec.fan_in_fan_out)
    pm = peft.get_peft_model(model, config)
    assert _lora_names(pm) == list(spec.modules)
    # trainable = exactly the LoRA factors of the resolved modules
    trainable = {n.removeprefix("base_model.model.").split(".lora_")[0]
                 for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == set(spec.modules)
    assert all(".lora_" in n for n, p in pm.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert pm(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 400)


def test_peft_layer_range_and_explicit():
    model = build("phi3")
    spec = resolve_targets(model, ["attention", "down_proj"], layers="1")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=list(spec.modules)))
    assert _lora_names(pm) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj",
                               "model.layers.1.self_attn.qkv_proj"]


def test_peft_gpt2_mixed_conv1d_and_linear(tmp_path):
    """Conv1D layers get fan_in_fan_out=True, the Linear lm_head False, and a reload matches."""
    spec = resolve_targets(build("gpt2"), ["all"])
    model = build("gpt2")
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie: see the tying test
    model.config.tie_word_embeddings = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=list(spec.modules),
                                                        fan_in_fan_out=True, init_lora_weights=False))
    assert any("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`" in str(w.message)
               for w in caught)
    flags = {n.removeprefix("base_model.model."): m.fan_in_fan_out for n, m in pm.named_modules()
             if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert flags["lm_head"] is False and flags["transformer.h.0.attn.c_attn"] is True
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        out = pm(x).logits
    pm.save_pretrained(tmp_path)
    base = build("gpt2")
    base.lm_head.weight = nn.Parameter(base.lm_head.weight.detach().clone())
    base.config.tie_word_embeddings = False
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, out)
        torch.testing.assert_close(pm.merge_and_unload()(x).logits, out, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_need_untying_before_merge():
    """The caveat in the module docstring: LoRA on a tied lm_head does not survive a merge."""
    from factlab.train.merge import untie_embeddings

    x = torch.tensor([[3, 4, 5, 6]])
    for untie in (False, True):
        model = tiny_model("llama")  # ties embed_tokens and lm_head, like SmolLM2
        if untie:
            assert untie_embeddings(model)
        spec = resolve_targets(model, ["lm_head"])
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=list(spec.modules),
                                                        init_lora_weights=False))
        with torch.no_grad():
            out = pm(x).logits
            merged = pm.merge_and_unload()(x).logits
        assert torch.allclose(merged, out, atol=1e-4) == untie
