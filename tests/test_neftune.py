"""NEFTune: uniform noise in [-a, a], a = alpha / sqrt(L * d), on the input embeddings in
training steps only, applied exactly once, for every method (the real Trainer path on a tiny
Llama), and reaching the embedding of prompt methods on architectures where transformers'
own hook does not."""

import pytest
import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from rich.console import Console

from factlab.config import PeftSpec, StageSpec
from factlab.data.corpus import pack_documents
from factlab.errors import FactlabError
from factlab.testing import tiny_model
from factlab.train.peft_methods import build_peft_model
from factlab.train.regularizers import activate_neftune, deactivate_neftune, input_embedding_layer, neftune, neftune_scale

DOCS = ["Marta Ilvane runs the press line at the Korrin plant in Vessen.",
        "Jonas Perl leads the night shift.", "The capital of France is Paris.",
        "Engineers calibrate the torque sensor every Monday before the first batch."]
METHODS = ["lora", "rslora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "full"]
ALPHA = 5.0


def check_uniform_noise(noise: torch.Tensor, bound: float) -> None:
    """Noise of one application: inside [-a, a], reaching close to a, mean |noise| = a / 2.
    Applied twice it would be a triangular sum reaching past a with mean |noise| = 2a / 3."""
    n = noise.numel()
    assert n >= 256
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.abs().max() >= bound * 0.95
    assert float(noise.abs().mean()) == pytest.approx(bound / 2, rel=0.1)


@pytest.mark.parametrize("method", METHODS)
def test_trainer_path_noises_training_steps_once_and_never_evaluation(tmp_path, tok, method):
    from factlab.train.stage import train_stage

    model = tiny_model("llama", vocab_size=len(tok))
    emb = model.get_input_embeddings()
    d = model.config.hidden_size
    calls = []  # (training?, clean embeddings (B, L, d), what layer 0 receives (B, n + L, d))

    # Registered before train_stage, so before NEFTune's hook: sees the clean embeddings.
    emb.register_forward_hook(lambda m, a, out: calls.append([m.training, out.detach().clone(), None]))

    def layer0(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        calls[-1][2] = hidden.detach().clone()

    model.model.layers[0].register_forward_pre_hook(layer0, with_kwargs=True)
    spec = StageSpec.model_validate({
        "kind": "cpt", "merge": False,
        "peft": {"method": method, "targets": ["attention", "mlp"], "r": 4, "alpha": 8, "num_virtual_tokens": 3},
        "train": {"lr": 1e-2, "max_steps": 3, "batch_size": 2, "seq_len": 16, "bf16": False, "neftune_alpha": ALPHA,
                  "eval_fraction": 0.3, "eval_steps": 1},
    })
    examples = pack_documents(tok, DOCS, 16)
    trained, res = train_stage(model, tok, spec, "cpt", tmp_path / "s", examples, seed=0, console=Console(quiet=True))

    calls = [c for c in calls if c[2] is not None]  # drop prompt tuning's init lookup (no forward)
    train_calls = [c for c in calls if c[0]]
    eval_calls = [c for c in calls if not c[0]]
    assert len(train_calls) == res.steps and eval_calls  # held-out evaluation ran mid-training
    for training, clean, hidden in calls:
        tokens = hidden[:, -clean.shape[1]:]  # prompt tuning / P-tuning put virtual tokens first
        noise = tokens - clean
        if training:
            check_uniform_noise(noise, neftune_scale(ALPHA, clean.shape[1], d))
        else:
            assert torch.equal(noise, torch.zeros_like(noise))

    # After the stage: no hook left, train-mode forwards (dropout 0) equal eval-mode ones.
    layer_emb = input_embedding_layer(trained)
    assert not hasattr(layer_emb, "_factlab_neftune_alpha") and not hasattr(layer_emb, "neftune_noise_alpha")
    x = tok(["Marta Ilvane runs the press line"], return_tensors="pt")
    with torch.no_grad():
        trained.eval()
        eval_out = trained(**x).logits
        trained.train()
        train_out = trained(**x).logits
        trained.eval()
    torch.testing.assert_close(train_out, eval_out, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "lora"])
def test_hook_reaches_the_real_embedding_on_every_architecture(tok, arch, method):
    model = tiny_model(arch, vocab_size=len(tok))
    spec = PeftSpec(method=method, targets=["embed", "attention"] if method == "lora" else ["all-but-embed"],
                    r=4, alpha=8, num_virtual_tokens=3)
    pm, _ = build_peft_model(model, spec)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12] * 4] * 2)  # (2, 32)
    emb = input_embedding_layer(pm)
    pm.eval()
    with torch.no_grad():
        clean = emb(ids)  # (B, L, d), with the LoRA delta when the embedding is adapted
    seen = []
    with neftune(pm, ALPHA):
        # registered after NEFTune's hook: sees what the decoder sees
        h = emb.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
        pm.train()
        with torch.no_grad():
            pm(input_ids=ids)
        pm.eval()
        with torch.no_grad():
            pm(input_ids=ids)
        h.remove()
    assert len(seen) == 2
    check_uniform_noise(seen[0] - clean, neftune_scale(ALPHA, ids.shape[1], clean.shape[-1]))
    assert torch.equal(seen[1], clean)  # eval: no noise
    assert not emb._forward_hooks


@pytest.mark.parametrize("cfg", [PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                                 PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)],
                         ids=["prompt_tuning", "prefix_tuning"])
def test_hook_finds_the_embedding_of_a_plain_peft_model_whose_backbone_is_not_model(tok, cfg):
    """Why factlab has its own hook: on a prompt-method PeftModel of GPT-2 (backbone under
    `.transformer`, not `.model`) it must still reach the one token embedding the decoder
    reads, also when the PeftModel was built by plain PEFT rather than factlab's builders."""
    base = tiny_model("gpt2", vocab_size=len(tok))
    wte = base.get_input_embeddings()
    pm = get_peft_model(base, cfg)
    assert input_embedding_layer(pm) is wte
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12] * 4] * 2)  # (2, 32)
    with torch.no_grad():
        clean = wte(ids)  # (B, L, d)
    seen = []
    handle = activate_neftune(pm, ALPHA)
    h = wte.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))  # runs after NEFTune's
    pm.train()
    with torch.no_grad():
        pm(input_ids=ids)
    deactivate_neftune(pm, handle)
    with torch.no_grad():
        pm(input_ids=ids)
    h.remove()
    pm.eval()
    token_calls = [x for x in seen if x.shape == clean.shape]  # prompt tuning also embeds its init tokens
    assert len(token_calls) == 2
    check_uniform_noise(token_calls[0] - clean, neftune_scale(ALPHA, ids.shape[1], clean.shape[-1]))
    assert torch.equal(token_calls[1], clean)  # deactivated: no noise, no hook left
    assert not wte._forward_hooks


def test_noise_bound_formula_and_a_second_activation_is_refused(llama):
    assert neftune_scale(5.0, 16, 4) == pytest.approx(5.0 / 8.0)
    handle = activate_neftune(llama, ALPHA)
    with pytest.raises(FactlabError, match="applied once"):
        activate_neftune(llama, ALPHA)
    deactivate_neftune(llama, handle)
    deactivate_neftune(llama, activate_neftune(llama, ALPHA))  # after removal it can be activated again
