"""The damage figure: relative perplexity increase on general text, through the real
perplexity function on a tiny model whose weights are perturbed."""

from __future__ import annotations

import pytest
import torch

from factlab.evaluate.metrics import damage
from factlab.evaluate.perplexity import builtin_general_text, perplexity
from factlab.testing import tiny_model, tiny_tokenizer


def test_damage_is_zero_unchanged_and_grows_with_weight_noise():
    tok = tiny_tokenizer()
    text = builtin_general_text()[:1500]
    model = tiny_model("llama", vocab_size=len(tok), seed=1)
    base = perplexity(model, tok, text, seq_len=64)["perplexity"]
    assert damage(base, perplexity(model, tok, text, seq_len=64)["perplexity"]) == 0.0
    figures = []
    g = torch.Generator().manual_seed(0)
    for scale in (0.05, 0.3, 1.0):
        noisy = tiny_model("llama", vocab_size=len(tok), seed=1)
        with torch.no_grad():
            for p in noisy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        figures.append(damage(base, perplexity(noisy, tok, text, seq_len=64)["perplexity"]))
    assert 0 < figures[0] < figures[1] < figures[2]


def test_damage_definition_and_bad_input():
    assert damage(10.0, 11.5) == pytest.approx(0.15)
    assert damage(10.0, 8.0) == pytest.approx(-0.2)  # a better model has negative damage
    for base, after in ((0.0, 1.0), (float("nan"), 1.0), (1.0, 0.0), (1.0, float("nan"))):
        with pytest.raises(ValueError):
            damage(base, after)
