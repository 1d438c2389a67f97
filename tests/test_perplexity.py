"""Perplexity on a tiny model against a by-hand computation; file errors; forgetting summary."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import processors

from factlab.errors import FactlabError
from factlab.evaluate.metrics import rate_summary
from factlab.evaluate.perplexity import (
    builtin_general_text,
    forgetting_summary,
    perplexity,
    perplexity_of_files,
)
from factlab.testing import tiny_model, tiny_tokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog. Engineers calibrate the torque sensor every "
    "Monday before the first batch, and the capital of Italy is Rome."
)


def _token_nll(model, context: list[int], target: int) -> float:
    """-log p(target | context) from one unbatched forward of exactly ``context``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context])).logits[0, -1]  # (V,)
    return float(-torch.log_softmax(logits.double(), dim=-1)[target])


def test_non_overlapping_matches_hand_computation(tok, llama):
    ids = tok(TEXT)["input_ids"]  # the tiny tokenizer adds no BOS
    n, L = len(ids), 16
    assert n > 3 * L  # several windows, the last one shorter
    # By hand: windows [0,16), [16,32), ...; inside each, token t is predicted from the
    # window's tokens before it; the window's first token is context only.
    nlls = []
    for start in range(0, n, L):
        window = ids[start : start + L]
        nlls += [_token_nll(llama, window[:t], window[t]) for t in range(1, len(window))]
    assert len(nlls) == n - math.ceil(n / L)
    expected = sum(nlls) / len(nlls)

    r = perplexity(llama, tok, TEXT, seq_len=L, batch_size=8)
    assert r["n_tokens"] == len(nlls)
    assert r["nll_per_token"] == pytest.approx(expected, abs=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert (r["seq_len"], r["stride"]) == (L, L)
    # batch size does not change the result; repeated calls are identical
    for bs in (1, 2, 3):
        assert perplexity(llama, tok, TEXT, seq_len=L, batch_size=bs)["nll_per_token"] == pytest.approx(
            r["nll_per_token"], abs=1e-6
        )
    assert perplexity(llama, tok, TEXT, seq_len=L) == r


def test_sliding_stride_scores_every_token_once(tok, llama):
    ids = tok(TEXT)["input_ids"]
    n, L, s = len(ids), 16, 6
    # By hand: token t (t >= 1) is scored in the first window [k*s, k*s + L) that contains
    # it, conditioned on that window's tokens before it.
    nlls = []
    for t in range(1, n):
        k = 0
        while k * s + L <= t:
            k += 1
        nlls.append(_token_nll(llama, ids[k * s : t], ids[t]))
    expected = sum(nlls) / len(nlls)
    r = perplexity(llama, tok, TEXT, seq_len=L, stride=s, batch_size=4)
    assert r["n_tokens"] == n - 1
    assert r["nll_per_token"] == pytest.approx(expected, abs=1e-5)
    assert perplexity(llama, tok, TEXT, seq_len=L, stride=s, batch_size=1)["nll_per_token"] == pytest.approx(
        expected, abs=1e-5
    )


def test_bos_makes_first_text_token_scored(llama):
    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.bos_token_id)]
    )
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == tok.bos_token_id
    text_ids = ids[1:]
    # One window holding everything: BOS is context, every text token is scored.
    nlls = [_token_nll(llama, ids[:t], ids[t]) for t in range(1, len(ids))]
    r = perplexity(llama, tok, TEXT, seq_len=128)
    assert r["n_tokens"] == len(text_ids)
    assert r["nll_per_token"] == pytest.approx(sum(nlls) / len(nlls), abs=1e-5)


def test_mode_restored_and_input_errors(tok, llama):
    llama.train()
    perplexity(llama, tok, TEXT, seq_len=32)
    assert llama.training
    llama.eval()
    perplexity(llama, tok, TEXT, seq_len=32)
    assert not llama.training
    with pytest.raises(FactlabError, match="empty"):
        perplexity(llama, tok, "")
    with pytest.raises(FactlabError, match="empty"):
        perplexity(llama, tok, "  \n")
    with pytest.raises(FactlabError, match="too short"):
        perplexity(llama, tok, "The")  # one token, no BOS: nothing to score
    with pytest.raises(ValueError):
        perplexity(llama, tok, TEXT, seq_len=16, stride=17)
    gpt2 = tiny_model("gpt2", vocab_size=len(tok))  # n_positions = 128
    with pytest.raises(FactlabError, match="context"):
        perplexity(gpt2, tok, TEXT, seq_len=256)


def test_builtin_general_text():
    text = builtin_general_text()
    assert 1500 <= len(text.split()) <= 2500
    assert text.isascii()


def test_perplexity_of_files(tmp_path, tok, llama):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "b.txt").write_text("The capital of France is Paris, and the capital of Italy is Rome.", encoding="utf-8")
    res = perplexity_of_files(llama, tok, [tmp_path / "a.txt", str(tmp_path / "b.txt")], seq_len=32)
    assert list(res) == ["a.txt", "b.txt"]
    assert res["a.txt"] == perplexity(llama, tok, TEXT, seq_len=32)


def test_perplexity_of_files_errors(tmp_path, tok, llama):
    (tmp_path / "empty.txt").write_text(" \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ok.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "ok.txt").write_text(TEXT, encoding="utf-8")
    cases = {
        tmp_path / "missing.txt": "does not exist",
        tmp_path / "sub": "is a directory",
        tmp_path / "latin1.txt": "not UTF-8",
        tmp_path / "empty.txt": "is empty",
    }
    for path, what in cases.items():
        with pytest.raises(FactlabError, match=what) as e:
            perplexity_of_files(llama, tok, [path])
        msg = str(e.value)
        assert str(path) in msg and "\n" not in msg
    with pytest.raises(FactlabError, match="named ok.txt"):
        perplexity_of_files(llama, tok, [tmp_path / "ok.txt", tmp_path / "sub" / "ok.txt"])


def _ppl(nll: float, n: int) -> dict:
    return {"nll_per_token": nll, "perplexity": math.exp(nll), "n_tokens": n, "seq_len": 256, "stride": 256}


def test_forgetting_summary_exact():
    before = {"perplexity": {"general.txt": _ppl(2.0, 500), "news.txt": _ppl(3.0, 100)},
              "locality": rate_summary([True, True, True, False])}
    after = {"perplexity": {"general.txt": _ppl(2.5, 500), "news.txt": _ppl(2.9, 100)},
             "locality": rate_summary([True, False, False, False])}
    s = forgetting_summary(before, after)
    g = s["perplexity"]["general.txt"]
    assert g["perplexity_before"] == pytest.approx(math.exp(2.0))
    assert g["perplexity_after"] == pytest.approx(math.exp(2.5))
    assert g["perplexity_ratio"] == pytest.approx(math.exp(0.5))  # 1.6487
    assert g["nll_delta"] == pytest.approx(0.5) and g["n_tokens"] == 500
    assert s["perplexity"]["news.txt"]["perplexity_ratio"] == pytest.approx(math.exp(-0.1))
    assert s["locality"]["delta"] == pytest.approx(0.25 - 0.75)
    assert s["locality"]["before"]["rate"] == 0.75 and s["locality"]["after"]["rate"] == 0.25
    # damage: mean relative perplexity increase over the texts, (e^0.5 - 1 + e^-0.1 - 1) / 2
    assert s["damage"] == pytest.approx((math.exp(0.5) - 1 + math.exp(-0.1) - 1) / 2)
    assert s["locality_greedy"] is None  # neither side measured greedy answers
    greedy = forgetting_summary({**before, "locality_greedy": rate_summary([True, True, False, False])},
                                {**after, "locality_greedy": rate_summary([False, False, False, False])})
    assert greedy["locality_greedy"]["delta"] == pytest.approx(-0.5)

    no_loc = forgetting_summary({"perplexity": before["perplexity"], "locality": None}, after)
    assert no_loc["locality"] is None
    assert forgetting_summary({"perplexity": {}}, {"perplexity": {}}) == {
        "perplexity": {}, "damage": None, "locality": None, "locality_greedy": None, "priming": None}
    empty_loc = forgetting_summary({"perplexity": before["perplexity"], "locality": rate_summary([])}, after)
    assert empty_loc["locality"]["delta"] is None


def test_forgetting_summary_mismatch():
    with pytest.raises(FactlabError, match="only before: \\['news.txt'\\]"):
        forgetting_summary({"perplexity": {"a.txt": _ppl(2.0, 5), "news.txt": _ppl(2.0, 5)}},
                           {"perplexity": {"a.txt": _ppl(2.0, 5)}})
    with pytest.raises(FactlabError, match="before scored 5 tokens, after 6"):
        forgetting_summary({"perplexity": {"a.txt": _ppl(2.0, 5)}}, {"perplexity": {"a.txt": _ppl(2.0, 6)}})
