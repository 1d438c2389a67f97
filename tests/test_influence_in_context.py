"""In-context influence: the exact prompt layout documented in influence.in_context."""

import numpy as np

from factlab.evaluate.scoring import Scorer, chat_prompt, split_pair
from factlab.influence.in_context import context_pairs, in_context_eif
from factlab.influence.samples import Sample
from factlab.testing import tiny_model

ROW = Sample("r", "Marta Ilvane runs the", " press line")
CHAT_ROW = Sample("q", "Who runs the press line?", "Marta Ilvane.", meta={"chat": True})
COLS = [
    Sample("p", "The press line is run by", " Marta Ilvane"),
    Sample("d", "", "Jonas Perl leads the night shift."),
    Sample("c", "Who leads the night shift?", "Jonas Perl.", meta={"chat": True}),
]


def test_layout_is_exactly_as_documented(tok):
    got = context_pairs(ROW, COLS, tok)
    assert got[0] == ("Marta Ilvane runs the press line\n\nThe press line is run by", " Marta Ilvane")
    assert got[1] == ("Marta Ilvane runs the press line\n\n", "Jonas Perl leads the night shift.")
    assert got[2] == (chat_prompt(tok, "Marta Ilvane runs the press line\n\nWho leads the night shift?"), "Jonas Perl.")
    # a chat sample in the prompt: question, newline, answer, no template
    assert context_pairs(CHAT_ROW, COLS[:1], tok)[0][0] == (
        "Who runs the press line?\nMarta Ilvane.\n\nThe press line is run by")


def test_scored_tokens_are_the_columns_own_and_no_bos_in_between(tok):
    for (ctx, cont), col in zip(context_pairs(ROW, COLS[:2], tok), COLS[:2]):
        ctx_ids, cont_ids = split_pair(tok, ctx, cont)
        assert tok.decode(cont_ids) == col.target
        assert tok.bos_token_id not in ctx_ids  # this tokenizer adds no BOS: none anywhere
        assert tok.decode(ctx_ids).startswith(ROW.text)


def test_matrix_is_the_scorer_on_that_layout_minus_the_base(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    res = in_context_eif(model, tok, [ROW, CHAT_ROW], COLS)
    scorer = Scorer(model, tok)

    def loss(ctx, cont):
        ll = scorer.loglikelihood([(ctx, cont)])[0]
        return -ll.logprob / ll.n_tokens

    base = [loss("The press line is run by", " Marta Ilvane"), loss("", "Jonas Perl leads the night shift."),
            loss(chat_prompt(tok, "Who leads the night shift?"), "Jonas Perl.")]
    want = [loss("Marta Ilvane runs the press line\n\nThe press line is run by", " Marta Ilvane") - base[0],
            loss("Marta Ilvane runs the press line\n\n", "Jonas Perl leads the night shift.") - base[1]]
    np.testing.assert_allclose(res.eif[0, :2], want, atol=1e-5)
    np.testing.assert_allclose(res.base_loss, base, atol=1e-5)
    assert res.eif.shape == (2, 3) and np.isfinite(res.eif).all()
