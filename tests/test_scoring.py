"""The scoring path: pair tokenization, batched log-likelihoods, greedy generation, probes."""

from __future__ import annotations

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from factlab.errors import FactlabError
from factlab.evaluate.facts import score_probes
from factlab.evaluate.generation import generate
from factlab.evaluate import engine, reference
from factlab.evaluate.lm import LM, Completion, Generation
from factlab.evaluate.probes import Probe
from factlab.evaluate.scoring import LogLik, Scorer, chat_prompt, split_pair
from factlab.testing import TINY_ARCHITECTURES, tiny_model, tiny_tokenizer

CONTEXTS = [
    "The capital of France is", "The capital of France is ", "The capital of France is  ",
    "The capital of Fr", "Question: Who leads the night shift?\nAnswer:", "Answer:\n", "tab\t",
    "Hello,", "(", "He said \"", "café", "naïve ", "日本の首都は", "日本の首都は「", "東京 ",
    "Jonas Perl leads", "0123", "emoji 🙂",
]
CONTINUATIONS = [
    "Paris", " Paris", "ance", "s Paris", " Marta Ilvane.", "!", "東京", " 東京です。", "\n",
    " 42", "ＡＢＣ１２３", "'s", "🙂🙂",
]


def test_split_pair_invariant(tok):
    for context in CONTEXTS:
        for continuation in CONTINUATIONS:
            ctx, cont = split_pair(tok, context, continuation)
            assert ctx + cont == tok.encode(context + continuation), (context, continuation)
            assert cont, (context, continuation)


def test_split_pair_moves_trailing_space_keeps_newline(tok):
    # "is " + "Paris" is scored as "is" + " Paris": the space belongs to the word after it.
    assert split_pair(tok, "The capital of France is ", "Paris") == \
        split_pair(tok, "The capital of France is", " Paris")
    assert split_pair(tok, "The capital of France is", " Paris")[1] == tok.encode(" Paris")
    # A chat template's trailing newline stays in the context: the answer is scored alone.
    ctx, cont = split_pair(tok, "<|im_start|>assistant\n", "Paris")
    assert cont == tok.encode("Paris")
    assert tok.decode(ctx).endswith("\n")


def test_split_pair_merge_across_boundary(tok):
    # "France i" + "s Paris": alone the context ends in tokens "Ġ", "i", but the whole text
    # merges them into "Ġis", so the context's tokens are not a prefix of the whole's. The
    # context is cut back and the merged token counts as continuation.
    context, continuation = "The capital of France i", "s Paris"
    whole = tok.encode(context + continuation)
    assert tok.encode(context) != whole[:len(tok.encode(context))]
    ctx, cont = split_pair(tok, context, continuation)
    assert ctx == tok.encode("The capital of France")
    assert ctx + cont == whole and tok.decode(cont) == " is Paris"


def test_split_pair_empty_continuation(tok):
    with pytest.raises(FactlabError, match="empty continuation"):
        split_pair(tok, "The capital of France is", "")


def test_split_pair_special_tokens_once():
    tok = tiny_tokenizer()
    # A tokenizer that adds BOS (<|im_start|>, id 1) by default, like Llama-2's.
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    ctx, cont = split_pair(tok, "The capital of France is", " Paris")
    assert ctx[0] == 1 and ctx.count(1) == 1
    assert ctx + cont == tok.encode("The capital of France is Paris")
    # Text that already starts with BOS (a chat template's output) gets no second BOS.
    ctx, cont = split_pair(tok, "<|im_start|>user\nhi", " Paris")
    assert ctx.count(1) == 1 and ctx[0] == 1


def manual_loglik(model, tok, context: str, continuation: str):
    """One pair alone, in one unpadded forward: log_softmax of the logits, then gather."""
    ctx, cont = split_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (T, V)
    logprobs = logits.float().log_softmax(-1)[len(ctx) - 1:-1]  # (len(cont), V)
    target = torch.tensor(cont)
    token_lp = logprobs.gather(-1, target[:, None]).squeeze(-1)
    return token_lp.double().sum().item(), len(cont), bool((logprobs.argmax(-1) == target).all())


PAIRS = [(c, x) for c in CONTEXTS[:9] for x in ("Paris", " Marta Ilvane.", " 東京です。")] + [
    ("Engineers calibrate the torque sensor every Monday before", " the first batch."),
    ("x", " y"),
]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_batched_loglikelihood_matches_unbatched(tok, model_type):
    model = tiny_model(model_type, vocab_size=len(tok))
    expected = [manual_loglik(model, tok, c, x) for c, x in PAIRS]
    for batch_size in (1, 4, 64):
        got = Scorer(model, tok, batch_size=batch_size).loglikelihood(PAIRS)
        assert len(got) == len(PAIRS)
        for (lp, n, greedy), ll in zip(expected, got):  # same order as the pairs
            assert ll.logprob == pytest.approx(lp, abs=1e-5)
            assert ll.n_tokens == n and ll.is_greedy == greedy
            assert ll.mean_logprob == pytest.approx(lp / n, abs=1e-5)


def test_is_greedy_on_constructed_continuation(tok, llama):
    context = "The capital of France is"
    ids = tok.encode(context)
    greedy_ids = []
    with torch.no_grad():
        for _ in range(3):  # the model's own argmax continuation, token by token
            next_id = llama(input_ids=torch.tensor([ids + greedy_ids])).logits[0, -1].argmax()
            greedy_ids.append(int(next_id))
    text = tok.decode(greedy_ids)
    assert split_pair(tok, context, text)[1] == greedy_ids  # precondition: text round-trips
    scorer = Scorer(llama, tok)
    ll_greedy, ll_other = scorer.loglikelihood([(context, text), (context, text + " Paris")])
    assert ll_greedy.is_greedy and ll_greedy.n_tokens == 3
    assert ll_other.n_tokens > 3 and not ll_other.is_greedy


def test_scorer_restores_train_mode(tok, llama):
    llama.train()
    Scorer(llama, tok).loglikelihood([("The capital of France is", " Paris")])
    assert llama.training
    llama.eval()
    generate(llama, tok, ["The capital"], max_new_tokens=2)
    assert not llama.training


def test_generate_greedy_batched_matches_single(tok, llama):
    prompts = ["The capital of France is", "Hi", "Question: Who leads the night shift? Answer:",
               "日本の首都は"]
    batched = [g[0].text for g in generate(llama, tok, prompts, max_new_tokens=6, batch_size=8)]
    single = [g[0].text for g in generate(llama, tok, prompts, max_new_tokens=6, batch_size=1)]
    assert batched == single
    assert all(isinstance(t, str) and t for t in batched)
    assert tok.padding_side == "right"  # the shared tokenizer is left as it was
    # Same as a plain unpadded greedy generate.
    ids = torch.tensor([tok.encode(prompts[0])])
    out = llama.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert batched[0] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_greedy_stops_at_eos(tok, llama):
    prompt = "The capital of France is"
    first = int(llama(input_ids=torch.tensor([tok.encode(prompt)])).logits[0, -1].argmax())
    llama.generation_config.eos_token_id = first  # the model's first token now ends the turn
    ((g,),) = generate(llama, tok, [prompt], max_new_tokens=5)
    assert g.text == "" and g.ended_with_eos


def test_chat_prompt(tok):
    assert chat_prompt(tok, "Who runs the press line?") == (
        "<|im_start|>user\nWho runs the press line?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(FactlabError, match="no chat template; qa probes need a chat model"):
        chat_prompt(tiny_tokenizer(chat_template=False), "Who?")


PROBES = [
    Probe(id="r1", fact="f1", kind="recall", prompt="The capital of France is", target="Paris",
          distractors=["Rome", "Berlin"]),
    Probe(id="p1", fact="f1", kind="paraphrase", prompt="France's capital city is ",
          target="Paris", distractors=["Rome"]),
    Probe(id="l1", kind="locality", prompt="日本の首都は", target="東京"),
    Probe(id="q1", fact="f2", kind="qa", prompt="Who leads the night shift?", target="Jonas Perl",
          distractors=["Marta Ilvane", "Edda Sorn"]),
]

ROW_FIELDS = {"id", "fact", "kind", "prompt", "target", "distractors", "target_logprob",
              "target_mean_logprob", "target_tokens", "target_is_greedy",
              "distractor_mean_logprobs", "correct", "rank", "greedy", "greedy_match",
              "greedy_tokens", "greedy_eos", "samples", "sample_hit_rate"}


def test_score_probes_rows_and_single_batched_call(tok, llama, monkeypatch):
    calls = []
    real = LM.complete

    def spy(self, requests, **kw):
        calls.append((list(requests), kw))
        return real(self, requests, **kw)

    monkeypatch.setattr(LM, "complete", spy)
    rows = score_probes(llama, tok, PROBES, batch_size=3)

    # one complete call: every candidate of every probe, the greedy answers and the samples
    assert len(calls) == 1
    requests, kw = calls[0]
    pairs = [(r.scored_context, c) for r in requests for c in r.continuations]
    assert len(pairs) == 3 + 2 + 1 + 3
    qa_context = chat_prompt(tok, "Who leads the night shift?")
    assert pairs[:6] == [
        ("The capital of France is", " Paris"), ("The capital of France is", " Rome"),
        ("The capital of France is", " Berlin"),
        ("France's capital city is ", "Paris"), ("France's capital city is ", "Rome"),
        ("日本の首都は", "東京"),  # Japanese takes no space
    ]
    assert pairs[6:] == [(qa_context, "Jonas Perl"), (qa_context, "Marta Ilvane"),
                         (qa_context, "Edda Sorn")]  # the assistant's answer, no space
    # Answers continue the prompt without its trailing space; qa answers get the longer budget.
    assert [r.prompt for r in requests] == ["The capital of France is", "France's capital city is", "日本の首都は",
                                            qa_context]
    max_new = max(r["target_tokens"] for r in rows) + 4
    assert [r.greedy_tokens for r in requests] == [max_new, max_new, max_new, 48]
    assert [r.samples for r in requests] == [0] * 4

    assert [r["id"] for r in rows] == ["r1", "p1", "l1", "q1"]
    for row, probe in zip(rows, PROBES):
        assert set(row) == ROW_FIELDS
        assert row["target_tokens"] >= 1
        per_token = row["target_logprob"] / row["target_tokens"]
        assert row["target_mean_logprob"] == pytest.approx(per_token)
        assert len(row["distractor_mean_logprobs"]) == len(probe.distractors)
        assert isinstance(row["greedy"], str) and isinstance(row["greedy_match"], bool)
    # The candidate numbers are the plain per-pair log-likelihoods.
    r1 = rows[0]
    lp, n, _ = manual_loglik(llama, tok, "The capital of France is", " Paris")
    assert r1["target_logprob"] == pytest.approx(lp, abs=1e-5) and r1["target_tokens"] == n
    assert r1["distractor_mean_logprobs"][1] == pytest.approx(
        manual_loglik(llama, tok, "The capital of France is", " Berlin")[0]
        / len(split_pair(tok, "The capital of France is", " Berlin")[1]), abs=1e-5)


def test_score_probes_correct_and_rank_from_known_logprobs(tok, llama, monkeypatch):
    # Hand-built log-likelihoods per (context, continuation), so the right answers are known
    # without the code's formula: candidates compare by log-prob per token (not by sum), a
    # tie counts against the target, and each number lands on its own candidate.
    qa = chat_prompt(tok, "Who leads the night shift?")
    known = {
        ("The capital of France is", " Paris"): LogLik(-4.0, 4, False),  # -1.0 per token
        ("The capital of France is", " Rome"): LogLik(-1.5, 1, False),  # -1.5: worse per token
        ("The capital of France is", " Berlin"): LogLik(-0.5, 1, True),  # -0.5: better
        ("France's capital city is ", "Paris"): LogLik(-2.0, 2, False),  # -1.0
        ("France's capital city is ", "Rome"): LogLik(-1.0, 1, True),  # -1.0: a tie
        ("日本の首都は", "東京"): LogLik(-0.25, 1, True),
        (qa, "Jonas Perl"): LogLik(-0.2, 2, True),  # -0.1: best
        (qa, "Marta Ilvane"): LogLik(-3.0, 3, False),
        (qa, "Edda Sorn"): LogLik(-2.0, 1, False),
    }
    answer = Generation("", 1, False)
    monkeypatch.setattr(LM, "complete", lambda self, requests, **kw: [
        Completion([known[(r.scored_context, c)] for c in r.continuations], answer, []) for r in requests])
    rows = {r["id"]: r for r in score_probes(llama, tok, PROBES)}
    r1, p1, l1, q1 = rows["r1"], rows["p1"], rows["l1"], rows["q1"]
    assert (r1["target_logprob"], r1["target_mean_logprob"], r1["target_tokens"]) == (-4.0, -1.0, 4)
    assert r1["distractor_mean_logprobs"] == [-1.5, -0.5]
    assert (r1["correct"], r1["rank"]) == (False, 2)  # by sum, Paris would rank 3
    assert (p1["correct"], p1["rank"]) == (False, 2)  # tie
    assert (q1["correct"], q1["rank"]) == (True, 1)
    assert q1["distractor_mean_logprobs"] == [-1.0, -2.0] and q1["target_is_greedy"]
    assert (l1["correct"], l1["rank"], l1["distractor_mean_logprobs"]) == (None, 1, [])


def test_score_probes_is_deterministic(tok, llama):
    first = score_probes(llama, tok, PROBES, batch_size=2)
    second = score_probes(llama, tok, PROBES, batch_size=2)
    assert first == second
    assert score_probes(llama, tok, []) == []


def test_score_probes_greedy_tokens(tok, llama, monkeypatch):
    seen = []
    real = LM.complete
    monkeypatch.setattr(LM, "complete",
                        lambda self, requests, **kw: seen.extend(r.greedy_tokens for r in requests) or real(self, requests, **kw))
    rows = score_probes(llama, tok, PROBES[:1], greedy_tokens=3)
    assert seen == [3] and rows[0]["greedy_tokens"] == 3


# -- the shared-prefix path: each distinct context runs once ---------------------------------

LONG_ANSWER = " Marta Ilvane runs the press line at the Korrin plant in Vessen, every night."
SHARED_PAIRS = [
    *[("The capital of France is", x) for x in (" Paris", " Rome", "Paris", " Marta Ilvane.",
                                                 LONG_ANSWER, "!", " Paris")],  # same context
    ("The capital of France i", "s Paris"),  # boundary merge: context cut to "...France"
    ("The capital of France", " is Paris"),  # the same tokens as the merged pair above
    ("The capital of France is ", "Rome"),  # trailing space moves to the continuation
    ("", " Paris"), ("", "Hello there"),  # empty context: scored after BOS
    ("x", " y"), ("(", "東京"), ("日本の首都は", "東京"), ("Answer:\n", "Jonas Perl"),
    *[("Engineers calibrate the torque sensor every Monday before", x)
      for x in (" the first batch.", " lunch", LONG_ANSWER)],
    *[("Question: Who leads the night shift?\nAnswer:", x)
      for x in (" Jonas Perl", " Edda Sorn", " Marta", "\n")],
]


def greedy_pairs(model, tok) -> list[tuple[str, str]]:
    """(context, the model's own argmax continuation of 1-3 tokens) for contexts whose greedy
    text round-trips through split_pair, plus that text followed by more (not greedy)."""
    pairs = []
    for context in CONTEXTS:
        ids, greedy = split_pair(tok, context, "x")[0], []
        with torch.no_grad():
            for _ in range(3):
                greedy.append(int(model(input_ids=torch.tensor([ids + greedy])).logits[0, -1].argmax()))
        for k in (3, 2, 1):
            text = tok.decode(greedy[:k])
            if text and split_pair(tok, context, text)[1] == greedy[:k]:
                pairs += [(context, text), (context, text + " Paris")]
                break
    return pairs


def spy_paths(monkeypatch) -> dict[str, int]:
    """Count the pairs each path scores: "shared" those given to the cached engine,
    "plain" those run whole on the reference path."""
    seen = {"shared": 0, "plain": 0}
    real_shared, real_plain = engine.run, reference.loglikelihood

    def shared(hf, rows, **kw):
        seen["shared"] += sum(len(r.conts) for r in rows)
        return real_shared(hf, rows, **kw)

    def plain(hf, pairs, batch_size):
        seen["plain"] += len(pairs)
        return real_plain(hf, pairs, batch_size)

    monkeypatch.setattr(engine, "run", shared)
    monkeypatch.setattr(reference, "loglikelihood", plain)
    return seen


def assert_same(got, expected, tol=1e-5):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.n_tokens == b.n_tokens, i
        assert a.logprob == pytest.approx(b.logprob, abs=tol), i
        assert a.is_greedy == b.is_greedy, i


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_shared_prefix_matches_per_pair(tok, model_type, monkeypatch):
    model = tiny_model(model_type, vocab_size=len(tok))
    greedy = greedy_pairs(model, tok)
    assert any(tok.encode(x) and len(split_pair(tok, c, x)[1]) > 1 for c, x in greedy[::2])
    pairs = SHARED_PAIRS + greedy
    # The reference: each pair alone, unpadded (an empty context is scored after BOS).
    expected = [LogLik(*manual_loglik(model, tok, c or tok.bos_token, x)) for c, x in pairs]
    assert any(e.is_greedy for e in expected) and not all(e.is_greedy for e in expected)
    plain = Scorer(model, tok, batch_size=4, share_prefix=False).loglikelihood(pairs)
    assert_same(plain, expected)

    seen = spy_paths(monkeypatch)
    # Batch sizes that put all contexts in one batch, split them, and split the
    # continuations of one context over several forwards (1: the long answers run alone).
    for batch_size in (1, 3, 64):
        got = Scorer(model, tok, batch_size=batch_size).loglikelihood(pairs)
        assert_same(got, expected)  # in the order of the pairs
        assert_same(got, plain)
    assert seen == {"shared": 3 * len(pairs), "plain": 0}  # no pair fell back


def test_shared_prefix_runs_each_context_once(tok, llama, monkeypatch):
    calls = []
    real_forward = llama.forward

    def forward(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape, kwargs.get("past_key_values") is not None))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(llama, "forward", forward)
    context = "The capital of France is"
    pairs = [(context, " Paris"), ("Hello,", " world"), (context, " Rome"), (context, "!"),
             (context, " Marta Ilvane."), ("Hello,", " Marta")]
    got = Scorer(llama, tok, batch_size=8).loglikelihood(pairs)
    # One forward over the 2 distinct contexts (left-padded), then one per candidate block
    # from the cache: block k feeds the k-th longest continuation of each context but its
    # last token (none for a block of one-token continuations).
    n_ctx = max(len(tok.encode(context)), len(tok.encode("Hello,")))
    conts = [sorted((split_pair(tok, c, x)[1] for c, x in pairs if c == ctx), key=len, reverse=True)
             for ctx in (context, "Hello,")]
    widths = [max(len(cs[k]) for cs in conts if k < len(cs)) - 1 for k in range(4)]
    assert calls == [(torch.Size([2, n_ctx]), False)] + [(torch.Size([2, w]), True) for w in widths if w]
    assert_same(got, Scorer(llama, tok, share_prefix=False).loglikelihood(pairs))

    # With batch_size 1 the long answer's block is a forward of its own; the next block
    # extends the same context cache, the long answer's positions masked out.
    calls.clear()
    pairs = [(context, " Marta Ilvane."), (context, LONG_ANSWER), (context, " Paris")]
    got = Scorer(llama, tok, batch_size=1).loglikelihood(pairs)
    multi = [x for _, x in pairs if len(split_pair(tok, context, x)[1]) > 1]
    assert [c[1] for c in calls] == [False] + [True] * len(multi)
    assert calls[1][0][1] == len(split_pair(tok, context, LONG_ANSWER)[1]) - 1  # longest first
    assert_same(got, [LogLik(*manual_loglik(llama, tok, c, x)) for c, x in pairs])


def test_shared_prefix_falls_back_for_too_long_pairs(tok, monkeypatch):
    # GPT-2's tiny config has 128 positions: a pair longer than that runs whole, its oldest
    # context dropped, on the plain path; the others still share their context.
    model = tiny_model("gpt2", vocab_size=len(tok))
    long_context = " ".join(["The capital of France is Paris."] * 30)
    pairs = [(long_context, " Paris"), ("The capital of France is", " Paris"),
             ("The capital of France is", " Rome")]
    assert len(tok.encode(long_context)) > 128
    seen = spy_paths(monkeypatch)
    got = Scorer(model, tok).loglikelihood(pairs)
    assert seen == {"shared": 2, "plain": 1}
    assert_same(got, Scorer(model, tok, share_prefix=False).loglikelihood(pairs))


def test_shared_prefix_with_peft_models(tok, monkeypatch):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    pairs = SHARED_PAIRS[:10]
    seen = spy_paths(monkeypatch)
    # LoRA keeps the model's positions and cache: the shared path applies.
    lora = get_peft_model(tiny_model("llama", vocab_size=len(tok)),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert_same(Scorer(lora, tok).loglikelihood(pairs),
                Scorer(lora, tok, share_prefix=False).loglikelihood(pairs))
    assert seen == {"shared": len(pairs), "plain": len(pairs)}
    # Prompt tuning prepends virtual tokens: every pair runs whole.
    prompt = get_peft_model(tiny_model("llama", vocab_size=len(tok)),
                            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    seen.update(shared=0, plain=0)
    Scorer(prompt, tok).loglikelihood(pairs)
    assert seen == {"shared": 0, "plain": len(pairs)}


@pytest.mark.real_model
def test_shared_prefix_matches_per_pair_on_smollm2(smollm2):
    model, tok = smollm2
    pairs = [(c, x) for c in ("The capital of France is", "Marta Ilvane runs the press line at",
                              chat_prompt(tok, "Who leads the night shift?"))
             for x in (" Paris", " the Korrin plant in Vessen", "Jonas Perl.", " a")]
    expected = [LogLik(*manual_loglik(model, tok, c, x)) for c, x in pairs]
    assert_same(Scorer(model, tok, batch_size=2).loglikelihood(pairs), expected, tol=1e-4)
    assert_same(Scorer(model, tok, share_prefix=False).loglikelihood(pairs), expected, tol=1e-4)


def test_shared_prefix_falls_back_for_other_caches(tok, monkeypatch):
    # LFM2 keeps convolution states beside its attention cache: they can't be copied per
    # row like keys and values, so every pair runs whole, with the same results.
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("lfm2", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  layer_types=["conv", "full_attention"],
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    pairs = SHARED_PAIRS[:10]
    seen = spy_paths(monkeypatch)
    got = Scorer(model, tok).loglikelihood(pairs)
    assert seen == {"shared": len(pairs), "plain": len(pairs)}  # tried, then ran whole
    assert_same(got, [LogLik(*manual_loglik(model, tok, c or tok.bos_token, x)) for c, x in pairs])
