"""The one-pass probe path (``LM.complete``): the same scores, greedy answers and samples as the
reference path (``loglikelihood`` + transformers' ``generate``) and as the code before it
(frozen in tests/data/eval_reference.json), the greedy steps it skips, the shared corpus
prefix, rows leaving a decoding batch, and the sampler's distribution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from factlab.evaluate import decoding, reference
from factlab.evaluate.decoding import Batch, decode, plan_batches, sample, sample_uniforms
from factlab.evaluate.facts import score_probes
from factlab.evaluate.generation import generate
from factlab.evaluate.lm import LM, PromptRequest
from factlab.evaluate.probes import Probe
from factlab.evaluate.tokens import TokenCache, chat_prompt, encode
from factlab.testing import TINY_ARCHITECTURES, fingerprint, tiny_model

REFERENCE = Path(__file__).parent / "data" / "eval_reference.json"
CORPUS = ("Marta Ilvane runs the press line at the Korrin plant in Vessen. Jonas Perl leads the night "
          "shift. Engineers calibrate the torque sensor every Monday before the first batch.")


def spy_reference(monkeypatch) -> list:
    """Prompts given to the reference path's generate (the cached path must not need it)."""
    calls = []
    real = reference.generate

    def spy(hf, prompts, *args, **kwargs):
        calls.append(prompts)
        return real(hf, prompts, *args, **kwargs)

    monkeypatch.setattr(reference, "generate", spy)
    return calls


def assert_same(got, ref, tol=1e-5):
    """Completions: scores within tol, the same greedy answers and samples."""
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert [(s.n_tokens, s.is_greedy) for s in g.scores] == [(s.n_tokens, s.is_greedy) for s in r.scores]
        assert [s.logprob for s in g.scores] == pytest.approx([s.logprob for s in r.scores], abs=tol)
        assert g.greedy == r.greedy
        assert g.samples == r.samples


def requests_for(model, tok, context: str | None = None) -> list[PromptRequest]:
    """Completion prompts and qa prompts, with and without the corpus before them; for each
    completion prompt also a request whose first candidate is the model's own greedy
    continuation (its tokens are taken from the scoring pass, not decoded again)."""
    prompts = ["The capital of France is", "The quick brown fox", "Marta Ilvane runs the", "日本の首都は", "("]
    qa = [chat_prompt(tok, f"{context}\n\n{q}" if context else q)
          for q in ("Who leads the night shift?", "Who runs the press line?")]
    prompts = [f"{context}\n\n{p}" if context else p for p in prompts]
    ref = LM(model, tok, share_prefix=False).generate(prompts, max_new_tokens=3)
    out = []
    for p, (g,) in zip(prompts, ref):
        out.append(PromptRequest(p, (" Paris", " Rome", " Marta Ilvane"), greedy_tokens=7, samples=3))
        out.append(PromptRequest(p, (g.text, " x"), greedy_tokens=7))  # the greedy answer's first 3 tokens
        out.append(PromptRequest(p, (g.text,), greedy_tokens=2, samples=1))  # ... which fill the whole budget
    out.append(PromptRequest(prompts[0], (" Paris",), context=prompts[0] + " "))  # scored after a space
    out += [PromptRequest(q, ("Jonas Perl", "Marta Ilvane"), greedy_tokens=9, samples=2) for q in qa]
    out.append(PromptRequest(qa[0], greedy_tokens=12))  # an answer only (the style prompts)
    return out


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
@pytest.mark.parametrize("context", [None, CORPUS])
def test_complete_matches_the_reference_path(tok, model_type, context, monkeypatch):
    model = tiny_model(model_type, vocab_size=len(tok))
    requests = requests_for(model, tok, context)
    kw = dict(temperature=1.0, sample_tokens=4, seed=5)
    ref = LM(model, tok, share_prefix=False).complete(requests, **kw)
    if model_type == "llama":  # its greedy text re-encodes to the same tokens
        assert any(r.scores[0].is_greedy for r in ref)  # some first candidates are the greedy answer
    calls = spy_reference(monkeypatch)
    for batch_size, gen_batch in ((16, 256), (2, 3)):
        got = LM(model, tok, batch_size=batch_size).complete(requests, gen_batch=gen_batch, **kw)
        assert_same(got, ref)
    assert calls == []  # all of it on the cached path


def test_score_probes_gives_the_rows_of_the_code_before(tok, llama):
    """Rows of tiny llama frozen from the code before the one-pass path (tools/make_eval_reference.py)."""
    saved = json.loads(REFERENCE.read_text(encoding="utf-8"))
    if fingerprint(llama, tok) != saved["fingerprint"]:
        pytest.skip("this torch/tokenizers builds other tiny weights than the frozen file's; "
                    "regenerate it with tools/make_eval_reference.py from the old code")
    probes = [Probe(**p) for p in saved["probes"]]
    got = {"plain": score_probes(llama, tok, probes, qa_tokens=12),
           "context": score_probes(llama, tok, probes, qa_tokens=12, context=saved["context"]),
           "greedy_tokens_2": score_probes(llama, tok, probes, qa_tokens=12, greedy_tokens=2)}
    for case, rows in got.items():
        for row, old in zip(rows, saved["cases"][case], strict=True):
            for key, value in old.items():
                if isinstance(value, float):
                    assert row[key] == pytest.approx(value, abs=1e-5), (case, row["id"], key)
                elif key == "distractor_mean_logprobs":
                    assert row[key] == pytest.approx(value, abs=1e-5), (case, row["id"], key)
                else:
                    assert row[key] == value, (case, row["id"], key)
    assert any(r["target_is_greedy"] for r in got["plain"])  # the accepted-target path ran
    gens = generate(llama, tok, saved["prompts"], max_new_tokens=10)
    assert [[g.text, g.n_tokens, g.ended_with_eos] for (g,) in gens] == saved["generate"]


def count_forwards(model, monkeypatch) -> list:
    """(input shape, cache length before) of every forward of ``model``."""
    calls = []
    real = model.forward

    def forward(*args, **kwargs):
        cache = kwargs.get("past_key_values")
        calls.append((tuple(kwargs["input_ids"].shape), cache.get_seq_length() if cache is not None else 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    return calls


def test_accepted_target_tokens_are_not_decoded_again(tok, llama, monkeypatch):
    prompt = "The capital of France is"
    ((greedy,),) = LM(llama, tok, share_prefix=False).generate([prompt], max_new_tokens=6)
    ((two,),) = LM(llama, tok, share_prefix=False).generate([prompt], max_new_tokens=2)
    assert two.n_tokens == 2 and not two.ended_with_eos
    calls = count_forwards(llama, monkeypatch)
    # The target is the first two greedy tokens: one prefill, one forward of the target (all
    # of it), then 6 - 2 tokens of which the first comes from that forward: 3 decoding steps.
    (out,) = LM(llama, tok).complete([PromptRequest(prompt, (two.text,), greedy_tokens=6)])
    assert out.scores[0].is_greedy and out.greedy == greedy
    assert [c[0][1] for c in calls] == [len(encode(tok, prompt)), 2, 1, 1, 1]
    # Not the greedy continuation: 5 decoding steps after the prefill and the target's forward.
    calls.clear()
    (out,) = LM(llama, tok).complete([PromptRequest(prompt, (" Rome Paris",), greedy_tokens=6)])
    assert not out.scores[0].is_greedy and out.greedy == greedy
    assert len(calls) == 2 + 5
    # A target that fills the budget is the answer: no decoding at all.
    calls.clear()
    (out,) = LM(llama, tok).complete([PromptRequest(prompt, (two.text,), greedy_tokens=2)])
    assert out.greedy == two and len(calls) == 2


def test_an_accepted_target_that_holds_eos_ends_the_answer(tok, llama):
    prompt = "The capital of France is"
    ((two,),) = LM(llama, tok, share_prefix=False).generate([prompt], max_new_tokens=2)
    first = encode(tok, prompt + two.text)[len(encode(tok, prompt))]
    llama.generation_config.eos_token_id = first  # the first greedy token now ends the turn
    requests = [PromptRequest(prompt, (two.text,), greedy_tokens=6)]
    (ref,) = LM(llama, tok, share_prefix=False).complete(requests)
    (got,) = LM(llama, tok).complete(requests)
    assert got.greedy == ref.greedy and got.greedy.ended_with_eos and got.greedy.n_tokens == 1


def test_the_shared_corpus_runs_once(tok, llama, monkeypatch):
    probes = [Probe(id=f"p{i}", kind="recall", prompt=p, target="Paris", distractors=["Rome"])
              for i, p in enumerate(["The capital of France is", "Marta Ilvane runs the", "The quick brown fox"])]
    probes += [Probe(id=f"q{i}", kind="qa", prompt=q, target="Jonas Perl", distractors=["Marta"])
               for i, q in enumerate(["Who leads the night shift?", "Who runs the press line?"])]
    calls = count_forwards(llama, monkeypatch)
    rows = score_probes(llama, tok, probes, context=CORPUS, qa_tokens=5)
    corpus = len(encode(tok, CORPUS))
    # One one-row forward per group of the corpus (completions, chat questions); no other
    # forward feeds it again.
    prefixes = [shape for shape, past in calls if shape[0] == 1 and past == 0]
    assert len(prefixes) == 2 and all(shape[1] >= corpus for shape in prefixes)
    assert all(shape[1] < corpus for shape, past in calls if past > 0)
    assert sum(1 for _, past in calls if past == 0) == 2  # nothing else runs without a cache
    monkeypatch.undo()
    import factlab.evaluate.facts as facts

    monkeypatch.setattr(facts, "LM", lambda *a, **k: LM(*a, **{**k, "share_prefix": False}))
    ref = score_probes(llama, tok, probes, context=CORPUS, qa_tokens=5)
    for r, e in zip(rows, ref):
        assert r["target_logprob"] == pytest.approx(e["target_logprob"], abs=1e-5)
        assert (r["greedy"], r["greedy_tokens"]) == (e["greedy"], e["greedy_tokens"])


def test_samples_of_a_prompt_do_not_depend_on_its_batch(tok, llama):
    prompts = ["The capital of France is", "Marta", "The quick brown fox jumps over the", "("]
    kw = dict(max_new_tokens=5, n=3, temperature=1.0, seed=1)
    together = generate(llama, tok, prompts, **kw)
    assert together == generate(llama, tok, prompts, batch_size=1, **kw)
    assert together == LM(llama, tok, share_prefix=False).generate(prompts, **kw)
    assert generate(llama, tok, prompts[1:2], **kw) == together[1:2]
    assert generate(llama, tok, prompts[1:2], **{**kw, "seed": 2}) != together[1:2]
    assert len({g.text for g in together[0]}) > 1  # the n samples of a prompt differ


def test_sample_inverts_the_distribution_exactly():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0, 0.5]])  # (1, V)
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.3, 0.8)):
        scores = logits / temperature
        if top_p < 1:
            from transformers.generation import TopPLogitsWarper

            scores = TopPLogitsWarper(top_p)(None, scores)
        p = scores.softmax(-1)[0]  # (V,)
        # Evenly spaced uniforms: each token is drawn in proportion to its probability, to
        # within one draw in N.
        n = 10_000
        u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        tokens = sample(logits.expand(n, -1), u, temperature, top_p)
        counts = torch.bincount(tokens, minlength=logits.shape[1]).double() / n
        assert counts.tolist() == pytest.approx(p.double().tolist(), abs=1.5 / n)
    # u at the very top never draws a token without probability
    assert sample(torch.tensor([[0.0, 0.0, float("-inf")]]), torch.tensor([1 - 2 ** -53]), 1.0).item() == 1


def test_sampled_tokens_follow_the_model_as_transformers_sampling_does(tok, llama):
    """Distributional equivalence: 4,000 first tokens drawn as ``LM.generate`` draws them (the
    prompt's seeded uniforms through ``sample``) against the model's softmax(logits / T), and
    against as many draws of transformers' sampling (torch.multinomial, the draws of the code
    before), by chi-square tests."""
    from scipy.stats import chi2_contingency, chisquare

    prompt, temperature, n = "The capital of France is", 0.2, 4000
    with torch.no_grad():
        logits = llama(input_ids=torch.tensor([encode(tok, prompt)])).logits[0, -1]  # (V,)
    p = (logits / temperature).softmax(-1).double()
    ours = sample(logits.expand(n, -1), sample_uniforms(3, [prompt], [n], 1)[:, 0], temperature).tolist()
    torch.manual_seed(3)
    theirs = torch.multinomial(p.float().expand(n, -1), 1).squeeze(1).tolist()
    keep = (p * n >= 5).nonzero().squeeze(1).tolist()  # bins with enough expected draws
    assert len(keep) >= 5

    rest = n * (1 - float(p[keep].sum())) >= 5  # the other tokens as one bin, if it is big enough

    def counts(ids):
        c = [sum(1 for t in ids if t == k) for k in keep]
        return c + [len(ids) - sum(c)] if rest else c

    expected = [float(p[k]) * n for k in keep]
    expected = expected + [n - sum(expected)] if rest else [e * n / sum(expected) for e in expected]
    assert chisquare(counts(ours), expected).pvalue > 1e-3
    assert chisquare(counts(theirs), expected).pvalue > 1e-3
    assert chi2_contingency([counts(ours), counts(theirs)]).pvalue > 1e-3
    # ... and these are the tokens LM.generate samples first
    (gens,) = generate(llama, tok, [prompt], max_new_tokens=1, n=50, temperature=temperature, seed=3)
    assert [g.text for g in gens] == [tok.decode([t], skip_special_tokens=True) for t in ours[:50]]


def test_decode_drops_rows_that_ended():
    """Four rows with budgets 1, 2, 6, 6 (the last emits the stop token 9 at its 3rd token):
    later steps run fewer rows, and every row gets its own tokens."""
    vocab, stop = 10, 9
    plan = {0: [1], 1: [2, 3], 2: [4, 4, 4, 4, 4, 4], 3: [5, 6, stop, 0, 0, 0]}
    steps, kept = [], []
    live = [0, 1, 2, 3]

    def logits_for(rows, t):
        out = torch.zeros((len(rows), vocab))
        for i, r in enumerate(rows):
            out[i, plan[r][t] if t < len(plan[r]) else 0] = 1.0
        return out

    state = {"t": 0}

    def step(ids, mask, positions):
        steps.append(ids.shape[0])
        assert mask.shape == (ids.shape[0], 3 + state["t"] + 1)
        state["t"] += 1
        return logits_for(live, state["t"])

    def keep(sel):
        kept.append(sel.tolist())
        live[:] = [live[i] for i in sel.tolist()]

    out = decode(step, keep, torch.ones((4, 3), dtype=torch.long), torch.full((4,), 3),
                 logits_for(live, 0), [1, 2, 6, 6], decoding.greedy_pick, [stop], pad_id=0)
    assert [d.tokens for d in out] == [[1], [2, 3], [4] * 6, [5, 6, stop]]
    assert [d.ended_with_eos for d in out] == [False, False, False, True]
    assert steps == [3, 2, 1, 1, 1]  # rows leave once a quarter of the batch is done
    assert kept == [[1, 2, 3], [1, 2], [0]]


def test_rows_of_one_state_share_a_forward_until_they_part():
    """Four samples of one prompt (one cache row): two take token 1 and two token 2, then the
    first two part again; where they part the cache keeps its rows in order and appends a
    copy of the parent for each new history, and a step runs one row per distinct history."""
    plan = {0: [1, 3, 5], 1: [1, 4, 5], 2: [2, 6, 6], 3: [2, 6, 6]}
    steps, kept = [], []

    def pick(logits, states, rows, t):
        assert logits.shape[0] == (1 if t[0] == 0 else 2 if t[0] == 1 else 3)
        return torch.tensor([plan[r][i] for r, i in zip(rows, t)])

    def step(ids, mask, positions):
        steps.append(ids[:, 0].tolist())
        return torch.zeros((ids.shape[0], 8))

    out = decode(step, lambda index: kept.append(index.tolist()), torch.ones((1, 2), dtype=torch.long),
                 torch.tensor([2]), torch.zeros((1, 8)), [3] * 4, pick, [7], pad_id=0, states=[0, 0, 0, 0])
    assert [d.tokens for d in out] == [plan[r] for r in range(4)]
    assert kept == [[0, 0], [0, 1, 0]]  # rows 0 and 1 stay, row 0's second token gets row 2
    assert steps == [[1, 2], [3, 6, 4]]  # the shared state fed once: 2 rows, then 3, not 4 and 4


def test_plan_batches_groups_shared_prefixes():
    corpus = list(range(100, 140))
    prompts = [corpus + [1, 2], [5, 6, 7], corpus + [3], [8], corpus + [4, 5, 6], list(range(50, 70)) + [1],
               list(range(50, 70)) + [2, 3]]
    batches = plan_batches(prompts, max_rows=2, max_tokens=10_000, min_shared=16)
    assert sorted(i for b in batches for i in b.rows) == list(range(len(prompts)))
    assert Batch([1, 3], 0) in batches  # nothing shared, longest first
    assert Batch([4, 0], 40) in batches and Batch([2], 40) in batches  # the corpus, 2 rows a batch
    assert Batch([6, 5], 20) in batches
    # The token budget splits batches too, and a prefix leaves each prompt a token of its own.
    assert all(len(b.rows) == 1 for b in plan_batches(prompts, max_rows=8, max_tokens=43)
               if b.shared == 40)
    assert plan_batches([[1] * 20, [1] * 20], 8, 1000) == [Batch([0, 1], 19)]


def test_token_cache_prefetch_equals_one_by_one(tok):
    pairs = [(c, x) for c in ("The capital of France is", "The capital of France is ", "日本の首都は", "",
                              chat_prompt(tok, "Who?"), "The capital of France i")
             for x in ("Paris", " Paris", "s Paris", "東京")]
    batched, single = TokenCache(tok), TokenCache(tok)
    batched.prefetch_pairs(pairs)
    assert [batched.split_pair(c, x) for c, x in pairs] == [single.split_pair(c, x) for c, x in pairs]
    texts = [c for c, _ in pairs]
    batched.prefetch(texts)
    assert [batched.encode(t) for t in texts] == [encode(tok, t) for t in texts]


def test_sample_uniforms_are_per_prompt():
    a = sample_uniforms(0, ["x", "z", "y"], [2, 0, 2], 3)
    assert a.shape == (4, 3) and torch.equal(sample_uniforms(0, ["y"], [2], 3), a[2:])
    assert torch.equal(sample_uniforms(0, ["y"], [1], 3), a[2:3])  # more samples extend, not change, the first
    assert not torch.equal(sample_uniforms(1, ["x"], [2], 3), a[:2])


def test_models_whose_cache_cannot_be_extended_use_the_reference_path(tok, monkeypatch):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("lfm2", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  layer_types=["conv", "full_attention"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    lfm2 = AutoModelForCausalLM.from_config(config).float().eval()
    prompt_tuned = get_peft_model(tiny_model("llama", vocab_size=len(tok)),
                                  PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    # GPT-2's tiny config has 128 positions: a prompt whose answer would reach the last one
    # takes the reference path too (transformers' generate still fits it).
    gpt2 = tiny_model("gpt2", vocab_size=len(tok))
    long = " ".join(["The capital of France is Paris."] * 10)
    assert 100 < len(encode(tok, long)) < 125
    for model, extra in ((lfm2, []), (prompt_tuned, []), (gpt2, [long])):
        budget = 129 - len(encode(tok, long)) if extra else 4
        requests = [PromptRequest(p, (" Paris", " Rome"), greedy_tokens=budget, samples=2)
                    for p in ["The capital of France is", "Marta", *extra]]
        calls = spy_reference(monkeypatch)
        got = LM(model, tok).complete(requests, temperature=1.0, sample_tokens=3)
        assert calls  # the reference path ran
        assert_same(got, LM(model, tok, share_prefix=False).complete(requests, temperature=1.0, sample_tokens=3))
        if extra:
            assert len(calls[0]) == 1  # only the long prompt
