"""The model interface in llama.cpp (models.llama_cpp_lm): a tiny model exported to GGUF, loaded in
llama.cpp, and its log-probs, greedy tokens, perplexity and probe rows compared with transformers'."""

from __future__ import annotations

import hashlib
import json

import gguf
import numpy as np
import pytest

from factlab.errors import FactlabError
from factlab.evaluate.facts import probe_requests, probe_rows, score_probes
from factlab.evaluate.lm import LM, PromptRequest
from factlab.evaluate.probes import load_probes
from factlab.models.gguf_export import export_gguf
from factlab.models.llama_cpp_lm import LlamaCppLM, check_gguf_target
from factlab.models.llama_cpp_pre import CHECK_TEXT, PRE_TOKENIZERS
from factlab.testing import tiny_model, tiny_tokenizer

# f16 weights against the fp32 model: the tolerance `factlab export --verify` states per token.
TOL = 0.02
PAIRS = [("The capital of France is", " Paris"), ("Juliet was in love with", " Bob."), ("", "Hello there"),
         # special tokens inside the continuation, the end-of-turn one included (llama.cpp stops there)
         ("Q: who?<|im_end|>", "<|im_start|>assistant\nBob<|im_end|>")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(transformers model, tokenizer, LlamaCppLM of its f16 export), one llama.cpp load per module."""
    tok = tiny_tokenizer()
    # The tiny tokenizer splits text by GPT-2's rules: registered as llama.cpp's `gpt-2` (see test_gguf.py).
    key = hashlib.sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    PRE_TOKENIZERS[key] = ("gpt-2", "factlab.testing.tiny_tokenizer")
    d = tmp_path_factory.mktemp("cpp-lm")
    model = tiny_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128)
    model.save_pretrained(d / "src")
    tok.save_pretrained(d / "src")
    try:
        path = export_gguf(d / "src", d / "m.gguf", "f16")
    finally:
        del PRE_TOKENIZERS[key]
    with LlamaCppLM(path) as cpp:
        yield model, tok, cpp


def test_log_probs_and_greedy_flags_match_transformers(exported):
    model, tok, cpp = exported
    lm = LM(model, tok)
    assert cpp.tokenize_pairs(PAIRS) == lm.tokenize_pairs(PAIRS)  # llama.cpp's tokenizer splits as transformers'
    for (ctx, cont), a, b in zip(lm.tokenize_pairs(PAIRS), lm.loglikelihood(PAIRS), cpp.loglikelihood(PAIRS)):
        assert a.n_tokens == b.n_tokens and abs(a.logprob - b.logprob) < TOL * a.n_tokens, (ctx, a, b)
        assert a.is_greedy == b.is_greedy
    # per token, against a hand computation on the transformers model
    ctx, cont = lm.tokenize_pairs(PAIRS[:1])[0]
    import torch

    with torch.no_grad():
        logp = model(torch.tensor([list(ctx + cont)])).logits[0].log_softmax(-1)
    ref = [logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)]
    top = [int(logp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont)]
    got = cpp.token_logprobs(ctx, cont)
    assert np.allclose([lp for lp, _ in got], ref, atol=TOL) and [g for _, g in got] == top


def test_greedy_answers_perplexity_and_samples(exported):
    model, tok, cpp = exported
    lm = LM(model, tok)
    prompts = ["The capital of France is", "Marta Ilvane runs the press line at"]
    a = lm.generate(prompts, max_new_tokens=6)
    b = cpp.generate(prompts, max_new_tokens=6)
    assert [g[0].text for g in a] == [g[0].text for g in b] and [g[0].n_tokens for g in b] == [6, 6]
    text = "The quick brown fox jumps over the lazy dog. " * 6
    (ra,), (rb,) = lm.loglikelihood_rolling([text], 16), cpp.loglikelihood_rolling([text], 16)
    assert ra.n_tokens == rb.n_tokens and abs(ra.logprob - rb.logprob) < TOL * ra.n_tokens
    # samples: seeded, so the same call gives the same samples; n per prompt, budget kept
    req = [PromptRequest("The capital of France is", samples=2)]
    s1 = cpp.complete(req, temperature=0.9, sample_tokens=5, seed=3)[0].samples
    s2 = cpp.complete(req, temperature=0.9, sample_tokens=5, seed=3)[0].samples
    assert s1 == s2 and len(s1) == 2 and all(g.n_tokens <= 5 for g in s1)
    with pytest.raises(FactlabError, match="greedy decoding gives one answer"):
        cpp.generate(prompts, max_new_tokens=2, n=2)


def test_probe_rows_of_every_kind_match_transformers(exported, tmp_path):
    model, tok, cpp = exported
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(p) for p in [
        {"id": "r", "kind": "recall", "prompt": "The press line is run by", "target": "Marta Ilvane", "distractors": ["Jonas Perl"]},
        {"id": "q", "kind": "qa", "prompt": "Who leads the night shift?", "target": "Jonas Perl", "distractors": ["Marta Ilvane"]},
        {"id": "l", "kind": "locality", "prompt": "The capital of France is", "target": "Paris", "distractors": ["Rome", "Bob"]},
    ]) + "\n")
    probes = load_probes(tmp_path / "p.jsonl")
    ref = score_probes(model, tok, probes)
    # the qa prompt is rendered by llama.cpp's own template engine: the same text as transformers'
    assert cpp.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    rows = probe_rows(probes, cpp.complete(probe_requests(cpp, probes)))
    for a, b in zip(ref, rows):
        assert abs(a["target_mean_logprob"] - b["target_mean_logprob"]) < TOL
        assert a["correct"] == b["correct"] and a["greedy"] == b["greedy"] and a["greedy_tokens"] == b["greedy_tokens"]


def test_q4_0_export_is_4_bit_and_loads_in_llama_cpp(exported, tmp_path):
    # q4_0 of the same tiny model: 4-bit blocks for the layers, the tied embedding (the logits'
    # matrix) 8-bit as llama.cpp's quantizer keeps it; llama.cpp loads it and stays near f16.
    model, tok, cpp = exported
    key = hashlib.sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
    PRE_TOKENIZERS[key] = ("gpt-2", "factlab.testing.tiny_tokenizer")
    try:
        src = cpp.path.parent / "src"
        out = export_gguf(src, tmp_path / "q4.gguf", "q4_0")
    finally:
        del PRE_TOKENIZERS[key]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    with LlamaCppLM(out) as q4:
        a, b = cpp.loglikelihood(PAIRS[:2]), q4.loglikelihood(PAIRS[:2])
    assert all(abs(x.logprob - y.logprob) < 0.5 * x.n_tokens for x, y in zip(a, b))
    assert any(abs(x.logprob - y.logprob) > 1e-4 for x, y in zip(a, b))  # it is quantized


def test_runtime_llama_cpp_needs_a_gguf_file(tmp_path):
    with pytest.raises(FactlabError, match="runs a .gguf file"):
        check_gguf_target(tmp_path)
    with pytest.raises(FactlabError, match="does not exist"):
        check_gguf_target(tmp_path / "x.gguf")
