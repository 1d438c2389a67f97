"""Step plans of hand-made corpora, both packings, and the too-few-steps warning."""


from factlab.data.corpus import cpt_examples, document_examples, pack_documents
from factlab.testing import tiny_model, tiny_tokenizer
from factlab.train.plan import MIN_EXPOSURES, MIN_STEPS, plan_stage, warning


def _examples(lengths):
    return [{"input_ids": [1] * n, "attention_mask": [1] * n, "labels": [1] * n} for n in lengths]


def test_issue_example_blocks_make_eight_steps():
    # 7 packed blocks, batch 8, 8 epochs: one (short) step an epoch
    plan = plan_stage(_examples([128] * 7), batch_size=8, grad_accum=1, epochs=8, max_steps=None)
    assert plan.optimizer_steps == 8
    assert plan.exposures == 8
    assert plan.tokens == 7 * 128 * 8
    assert "only 8 optimizer steps" in warning(plan, "cpt")


def test_documents_make_one_example_each():
    plan = plan_stage(_examples([20] * 50), batch_size=8, grad_accum=1, epochs=8, max_steps=None)
    assert plan.optimizer_steps == 7 * 8  # ceil(50 / 8) = 7 steps an epoch
    assert plan.exposures == 8
    assert warning(plan, "cpt") is None


def test_grad_accum_and_max_steps():
    plan = plan_stage(_examples([10] * 40), batch_size=4, grad_accum=2, epochs=1, max_steps=10)
    assert plan.batch_size == 8 and plan.optimizer_steps == 10
    assert plan.exposures == 2  # 5 steps an epoch
    assert plan.tokens == 40 * 10 * 2


def test_fractional_epochs_round_up_to_whole_steps():
    plan = plan_stage(_examples([10] * 10), batch_size=4, grad_accum=1, epochs=0.5, max_steps=None)
    assert plan.optimizer_steps == 2  # ceil(3 * 0.5)


def test_warning_fires_below_the_step_threshold_and_not_at_it():
    per_step = 1
    at = plan_stage(_examples([5] * MIN_STEPS), batch_size=per_step, grad_accum=1, epochs=MIN_EXPOSURES, max_steps=MIN_STEPS)
    assert at.optimizer_steps == MIN_STEPS
    below = plan_stage(_examples([5] * MIN_STEPS), batch_size=per_step, grad_accum=1, epochs=1, max_steps=MIN_STEPS - 1)
    assert warning(below, "cpt") is not None and f"only {MIN_STEPS - 1} optimizer steps" in warning(below, "cpt")
    # at the threshold of steps but too few passes: the passes warning, not the steps one
    w = warning(at, "cpt")
    assert w is not None and "optimizer steps" not in w and "seen 1 times" in w
    enough = plan_stage(_examples([5] * 10), batch_size=1, grad_accum=1, epochs=MIN_EXPOSURES, max_steps=None)
    assert enough.optimizer_steps == MIN_STEPS and warning(enough, "cpt") is None


def test_packings_on_a_hand_made_corpus():
    tok = tiny_tokenizer()
    docs = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota kappa"]
    lens = [len(tok(d)["input_ids"]) + 1 for d in docs]  # + EOS
    blocks = pack_documents(tok, docs, seq_len=8)
    assert [len(b["input_ids"]) for b in blocks] == [8] * (sum(lens) // 8) + ([sum(lens) % 8] if sum(lens) % 8 > 1 else [])
    per_doc = document_examples(tok, docs, seq_len=64)
    assert [len(e["input_ids"]) for e in per_doc] == lens
    assert all(e["input_ids"][-1] == tok.eos_token_id for e in per_doc)
    cut = document_examples(tok, docs, seq_len=3)
    assert sum(len(e["input_ids"]) for e in cut) == sum(lens) - sum(1 for n in lens if n % 3 == 1)
    assert cpt_examples(tok, docs, 64, "documents") == per_doc


def test_document_packing_never_attends_across_documents():
    """The logits of each document in a padded batch equal those of the document run alone."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    tok = tiny_tokenizer()
    model = tiny_model().eval()
    docs = ["alpha beta gamma delta", "epsilon", "zeta eta theta iota kappa lambda mu"]
    examples = document_examples(tok, docs, seq_len=64)
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(examples)
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, e in enumerate(examples):
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            n = len(e["input_ids"])
            cols = (batch["attention_mask"][i] == 1).nonzero().squeeze(1)
            torch.testing.assert_close(together[i, cols][:n], alone, atol=1e-5, rtol=1e-5)


def _stage(**train):
    from factlab.config import StageSpec

    return StageSpec(kind="cpt", train={"packing": "documents", **train})


def test_documents_stage_flattens_and_keeps_each_document_apart():
    """The collator factlab picks for `packing: documents` lays a batch's documents in one
    unpadded row; each document's logits equal those of the document alone, and the loss equals
    the padded batch's loss."""
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from factlab.methods import method_info
    from factlab.train.collators import stage_collator

    tok = tiny_tokenizer()
    model = tiny_model().eval()
    docs = ["alpha beta gamma delta", "epsilon zeta", "eta theta iota kappa lambda mu"]
    examples = document_examples(tok, docs, seq_len=64)
    collate = stage_collator(model, tok, _stage(), method_info("lora"))
    assert isinstance(collate, DataCollatorWithFlattening)
    batch = collate(examples)
    assert batch["use_cache"] is False  # with a cache, transformers skips the packed-sequence mask
    assert batch["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    with torch.no_grad():
        model.train()  # as the Trainer runs it: the mode in which a forgotten use_cache=False crosses documents
        out = model(**batch)
        start = 0
        for e in examples:
            n = len(e["input_ids"])
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            torch.testing.assert_close(out.logits[0, start:start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
        padded = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)(examples)
        ref = model(**padded).loss
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)


def test_stages_that_must_pad_get_the_padding_collator():
    from transformers import DataCollatorForSeq2Seq

    from factlab.config import StageSpec
    from factlab.methods import method_info
    from factlab.train.collators import stage_collator

    tok, model = tiny_tokenizer(), tiny_model()
    padded = DataCollatorForSeq2Seq
    blocks = StageSpec(kind="cpt", train={"packing": "blocks"})
    assert isinstance(stage_collator(model, tok, blocks, method_info("lora")), padded)
    assert isinstance(stage_collator(model, tok, StageSpec(kind="sft"), method_info("lora")), padded)
    assert isinstance(stage_collator(model, tok, _stage(), method_info("prompt_tuning")), padded)
    assert isinstance(stage_collator(model, tok, _stage(neftune_alpha=5.0), method_info("lora")), padded)


def test_flattening_check_fails_for_a_model_that_attends_across_documents():
    """A model that ignores position ids (here: a wrapper dropping them) must not be flattened."""
    import torch

    from factlab.train.collators import flattening_keeps_documents_apart

    model = tiny_model()

    class NoPositions(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, position_ids=None):
            return self.inner(input_ids=input_ids)

    assert flattening_keeps_documents_apart(model)
    assert not flattening_keeps_documents_apart(NoPositions(model))


def test_documents_that_fill_the_rows_pad_instead_of_one_long_row():
    """The flattening collator pads a batch when one row of all its tokens would cost more
    attention than the padding saves (long documents), and flattens short mixed ones."""
    from factlab.methods import method_info
    from factlab.train.collators import FlattenDocuments, stage_collator

    tok = tiny_tokenizer()
    model = tiny_model().eval()
    collate = stage_collator(model, tok, _stage(), method_info("lora"))
    assert isinstance(collate, FlattenDocuments) and collate.padded is not None
    long_docs = [{"input_ids": list(range(5, 5 + 256)), "labels": list(range(5, 5 + 256))} for _ in range(8)]
    short = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (256, 12, 9, 20)]
    assert not collate.flattens([256] * 8) and collate.flattens([256, 12, 9, 20])
    padded = collate(long_docs)
    assert padded["input_ids"].shape == (8, 256) and "position_ids" not in padded
    flat = collate(short)
    assert flat["input_ids"].shape == (1, 256 + 12 + 9 + 20) and flat["use_cache"] is False
