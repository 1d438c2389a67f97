"""The exact EIF on a tiny random model: the in-memory reset leaves no trace (row order and
repetition do not change a row, bit for bit), it equals a reload-from-disk fine-tune per row,
the sign convention, and the training loss is the scored loss."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from factlab.config import PeftSpec
from factlab.evaluate.scoring import Scorer
from factlab.influence.exact import Schedule, deterministic, exact_eif, fresh_adapter, sample_tokens
from factlab.influence.samples import Sample
from factlab.testing import tiny_model

SAMPLES = [
    Sample("a", "Marta Ilvane runs the", " press line", group="f1"),
    Sample("b", "The capital of France is", " Paris", group="f2"),
    Sample("c", "Jonas Perl leads the", " night shift", group="f3"),
    Sample("d", "", "The quick brown fox jumps over the lazy dog."),  # a document: all of it scored
]
PEFT = PeftSpec(targets=["attention", "mlp"], r=4, alpha=8)


@pytest.fixture()
def model(tok):
    return tiny_model("llama", vocab_size=len(tok))


def test_row_order_and_repetition_leave_no_trace(model, tok):
    sched = Schedule(steps=2, lr=1e-2)
    first = exact_eif(model, tok, SAMPLES[:3], SAMPLES, PEFT, sched)
    again = exact_eif(model, tok, [SAMPLES[2], SAMPLES[0], SAMPLES[2]], SAMPLES, PEFT, sched)
    # row c computed first, computed last after other rows, and computed in another call
    assert np.array_equal(again.eif[0, 0], again.eif[0, 2])
    assert np.array_equal(first.eif[0, 2], again.eif[0, 0])
    assert np.array_equal(first.eif[0, 0], again.eif[0, 1])
    assert np.array_equal(first.base_loss, again.base_loss)
    assert not np.array_equal(first.eif[0, 0], first.eif[0, 1])  # rows do differ


@pytest.mark.parametrize("peft", [PEFT, PeftSpec(method="full", targets=["mlp"]), PeftSpec(method="ia3", targets=["mlp"])],
                         ids=["lora", "full", "ia3"])
def test_model_comes_back_unchanged(model, tok, peft):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = exact_eif(model, tok, SAMPLES[:2], SAMPLES, peft, Schedule(lr=1e-2))
    assert (np.diag(res.eif[0][:, :2]) < 0).all()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _reload_row(path, tok, sample, columns, lr, steps, seed):
    """One row the slow, independent way: load from disk, fresh adapter, a hand-written
    AdamW loop on the sample, then score with the Scorer."""
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pairs = [(c.prompt, c.target) for c in columns]
    def losses(mm):
        return np.array([-x.logprob / x.n_tokens for x in Scorer(mm, tok).loglikelihood(pairs)])
    base = losses(m)
    wrapped, params = fresh_adapter(m, PEFT, seed)
    ids, n_ctx = sample_tokens(tok, sample)
    x = torch.tensor([ids])
    labels = torch.tensor([[-100] * n_ctx + ids[n_ctx:]])  # the stages' loss: labelled tokens only
    opt = torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=0.0)
    wrapped.train()
    for _ in range(steps):
        opt.zero_grad()
        wrapped(input_ids=x, labels=labels).loss.backward()
        opt.step()
    wrapped.eval()
    return losses(wrapped) - base


def test_reset_equals_reload_from_disk(model, tok, tmp_path):
    model.save_pretrained(tmp_path)
    res = exact_eif(model, tok, SAMPLES, SAMPLES, PEFT, Schedule(steps=2, lr=5e-3), seeds=[3])
    for i, s in enumerate(SAMPLES):
        with deterministic():
            ref = _reload_row(tmp_path, tok, s, SAMPLES, lr=5e-3, steps=2, seed=3)
        np.testing.assert_allclose(res.eif[0, i], ref, atol=1e-6)


@pytest.mark.parametrize("optimizer,lr", [("adamw", 1e-2), ("sgd", 0.5)])
def test_training_on_a_sample_lowers_its_own_loss(model, tok, optimizer, lr):
    res = exact_eif(model, tok, SAMPLES, SAMPLES, PEFT, Schedule(lr=lr, optimizer=optimizer))
    assert (np.diag(res.eif[0]) < 0).all()


def test_training_loss_is_the_scored_loss(model, tok):
    # The loss a row trains on (before its first step) is L_i(θ_0) as the Scorer measures it,
    # documents included: same tokens, same scored part.
    res = exact_eif(model, tok, SAMPLES, SAMPLES, PEFT, Schedule(lr=1e-3))
    np.testing.assert_allclose(res.train_loss[0, :, 0], res.base_loss[0], atol=1e-5)


def test_document_is_scored_after_bos(tok):
    ids, n_ctx = sample_tokens(tok, SAMPLES[3])
    assert n_ctx == 1 and ids[0] == tok.bos_token_id
    assert ids[1:] == tok.encode(SAMPLES[3].target)


def test_seeds_change_the_adapter_not_the_base(model, tok):
    res = exact_eif(model, tok, SAMPLES[:2], SAMPLES, PEFT, Schedule(steps=2, lr=1e-2), seeds=[0, 1])
    assert np.array_equal(res.base_loss[0], res.base_loss[1])  # LoRA starts at B = 0: θ_0 itself
    assert not np.array_equal(res.eif[0], res.eif[1])
    assert res.eif.shape == (2, 2, 4) and res.row_seconds.shape == (2, 2)
