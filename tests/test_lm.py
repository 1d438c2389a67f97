"""The model interface's shared parts: context length, padding, eval mode, rolling
log-likelihoods, generation from an empty prompt, cache reuse, and the module boundaries."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import factlab.evaluate
from factlab.errors import FactlabError
from factlab.evaluate.interface import LanguageModel
from factlab.evaluate.kvcache import can_extend_rows, keep_rows, make_room, select_rows
from factlab.evaluate.lm import LM, RollingLogLik, eval_mode, max_positions, pad
from factlab.evaluate.perplexity import perplexity
from factlab.testing import tiny_model


def test_max_positions_on_tiny_llama_and_gpt2(tok):
    llama = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=64)
    gpt2 = tiny_model("gpt2", vocab_size=len(tok), n_positions=96)  # GPT-2 names it n_positions
    assert max_positions(llama) == 64
    assert max_positions(gpt2) == 96
    assert LM(gpt2, tok).max_length == 96
    # Every caller sees the same limit: perplexity refuses a window beyond it.
    with pytest.raises(FactlabError, match=r"seq_len 128 is longer than the model's context \(96 tokens\)"):
        perplexity(gpt2, tok, "The quick brown fox jumps over the lazy dog.", seq_len=128)


def test_max_positions_of_wrapped_multimodal_and_unlimited_models(tok):
    from peft import LoraConfig, get_peft_model
    from transformers import BloomConfig, Gemma3Config

    lora = get_peft_model(tiny_model("llama", vocab_size=len(tok), max_position_embeddings=48),
                          LoraConfig(r=2, target_modules=["q_proj"]))
    assert max_positions(lora) == 48  # the base model's
    # Gemma 3's top-level config has no length; its text model's has.
    assert max_positions(SimpleNamespace(config=Gemma3Config(text_config={"max_position_embeddings": 4096}))) == 4096
    # BLOOM (ALiBi) has no fixed context: no limit, rather than a made-up 2048.
    assert max_positions(SimpleNamespace(config=BloomConfig())) is None


def test_pad_left_and_right():
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([(5, 6, 7), (8,)], pad_id=9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_eval_mode_restores_the_mode_even_after_an_error(llama):
    llama.train()
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(llama):
            assert not llama.training and torch.is_inference_mode_enabled()
            raise RuntimeError("boom")
    assert llama.training and not torch.is_inference_mode_enabled()
    llama.eval()
    with eval_mode(llama):
        pass
    assert not llama.training


def _token_logprob(model, context: list[int], target: int) -> float:
    """log p(target | context) from one unbatched forward of exactly ``context``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context])).logits[0, -1]  # (V,)
    return float(torch.log_softmax(logits.double(), dim=-1)[target])


def test_loglikelihood_rolling_by_hand_per_text(tok, llama):
    text = "Engineers calibrate the torque sensor every Monday before the first batch."
    streams = [list(range(10, 31)), [7, 8, 9, 10, 11], tok.encode(text)]
    L, s = 8, 3
    got = LM(llama, tok, batch_size=2).loglikelihood_rolling([streams[0], streams[1], text], L, s)
    assert all(isinstance(r, RollingLogLik) for r in got)
    for ids, r in zip(streams, got):
        # By hand: token t (t >= 1) is scored in the first window [k*s, k*s + L) that
        # contains it, conditioned on that window's tokens before it.
        expected = []
        for t in range(1, len(ids)):
            k = 0
            while k * s + L <= t:
                k += 1
            expected.append(_token_logprob(llama, ids[k * s:t], ids[t]))
        assert r.n_tokens == len(ids) - 1
        assert r.logprob == pytest.approx(sum(expected), abs=1e-5)
    with pytest.raises(FactlabError, match="too short"):
        LM(llama, tok).loglikelihood_rolling([[5]], L)


def test_generate_from_an_empty_prompt_starts_after_bos(tok, llama):
    ((g,),) = LM(llama, tok).generate([""], max_new_tokens=4)
    with torch.no_grad():
        out = llama.generate(input_ids=torch.tensor([[tok.bos_token_id]]), max_new_tokens=4,
                             do_sample=False, pad_token_id=0, eos_token_id=tok.eos_token_id)
    new = out[0, 1:].tolist()
    cut = new.index(tok.eos_token_id) if tok.eos_token_id in new else len(new)
    assert g.text == tok.decode(new[:cut], skip_special_tokens=True)


def test_select_rows_copies_without_touching_the_cache(tok, llama):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])  # (2, 4)
    with torch.no_grad():
        cache = llama(input_ids=ids, use_cache=True).past_key_values
    assert can_extend_rows(cache)
    before = [layer.keys.clone() for layer in cache.layers]  # (2, heads, P, head_dim)
    sub = select_rows(cache, torch.tensor([1, 1, 0]))
    assert sub.layers[0].keys.shape[0] == 3
    torch.testing.assert_close(sub.layers[0].keys[2], before[0][0])
    with torch.no_grad():  # extending the copy leaves the original as it was
        llama(input_ids=torch.tensor([[5], [6], [7]]), past_key_values=sub, use_cache=True)
    assert sub.layers[0].keys.shape[2] == before[0].shape[2] + 1
    for layer, keys in zip(cache.layers, before):
        assert torch.equal(layer.keys, keys)
    assert not can_extend_rows(None) and not can_extend_rows(((torch.zeros(1),),))


def test_no_private_name_is_imported_across_evaluate_modules():
    package = Path(factlab.evaluate.__file__).parent
    crossings = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("factlab"):
                crossings += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_")]
    assert crossings == []


def test_make_room_writes_new_positions_in_place_with_the_same_results(tok, llama):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])  # (2, 4)
    with torch.no_grad():
        plain = llama(input_ids=ids, use_cache=True).past_key_values
        roomy = llama(input_ids=ids, use_cache=True).past_key_values
        make_room(roomy, 3)
        assert can_extend_rows(roomy) and roomy.get_seq_length() == 4
        buffer = roomy.layers[0]._keys
        steps = [torch.tensor([[13], [14]]), torch.tensor([[15, 16], [17, 18]]), torch.tensor([[19], [20]])]
        for step in steps:  # 1 + 2 fit the room; the third grows the buffer
            a = llama(input_ids=step, past_key_values=plain, use_cache=True).logits
            b = llama(input_ids=step, past_key_values=roomy, use_cache=True).logits
            torch.testing.assert_close(a, b)
            if step is steps[1]:
                assert roomy.layers[0]._keys is buffer  # written in place, no copy
        assert roomy.layers[0]._keys is not buffer and roomy.get_seq_length() == plain.get_seq_length() == 8
        for lp, lr in zip(plain.layers, roomy.layers):
            assert torch.equal(lp.keys, lr.keys) and torch.equal(lp.values, lr.values)
        # copies of rows keep their own room; the original is untouched by them
        sub = select_rows(roomy, torch.tensor([1, 1]))
        before = roomy.layers[0].keys.clone()
        llama(input_ids=torch.tensor([[1], [2]]), past_key_values=sub, use_cache=True)
        assert torch.equal(roomy.layers[0].keys, before) and sub.get_seq_length() == 9
        keep_rows(roomy, torch.tensor([0]))
        assert roomy.layers[0].keys.shape[0] == 1 and torch.equal(roomy.layers[0].keys[0], before[0])


def test_kept_rows_that_repeat_others_are_appended_in_place(tok, llama):
    """keep_rows with every row in order plus copies of some (samples that part): the copies go
    into spare rows of the buffers (no new buffer until those run out), and the cache equals a
    gathered one row for row, before and after the next forward."""
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])  # (2, 4)
    with torch.no_grad():
        grown = llama(input_ids=ids, use_cache=True).past_key_values
        make_room(grown, 4)
        index = torch.tensor([0, 1, 1, 0])
        gathered = select_rows(grown, index)
        keep_rows(grown, index[:3])  # row capacity 2 -> 4: one copy of the rows in use
        buffer = grown.layers[0]._keys
        keep_rows(grown, torch.tensor([0, 1, 2, 0]))  # a copy of row 0 fits: written in place
        assert grown.layers[0]._keys is buffer and buffer.shape[0] == 4
        for lg, lr in zip(grown.layers, gathered.layers):
            assert torch.equal(lg.keys, lr.keys) and torch.equal(lg.values, lr.values)
        step = torch.tensor([[13], [14], [15], [16]])
        a = llama(input_ids=step, past_key_values=grown, use_cache=True).logits
        b = llama(input_ids=step, past_key_values=gathered, use_cache=True).logits
        torch.testing.assert_close(a, b)
        for lg, lr in zip(grown.layers, gathered.layers):
            assert torch.equal(lg.keys, lr.keys) and lg.keys.shape[0] == 4
        keep_rows(grown, torch.tensor([3, 0]))  # anything else gathers
        assert torch.equal(grown.layers[0].keys, gathered.layers[0].keys[[3, 0]])


def test_lm_implements_the_language_model_protocol(tok, llama):
    """LM has every method of interface.LanguageModel with the same parameters (names, kinds,
    defaults): the contract another backend implements too. The interface imports no torch."""
    import inspect
    import subprocess
    import sys

    assert isinstance(LM(llama, tok), LanguageModel)
    methods = [n for n, v in vars(LanguageModel).items() if callable(v) and not n.startswith("_")]
    assert {"loglikelihood", "loglikelihood_rolling", "generate", "complete"} <= set(methods)
    for name in methods:
        ours, contract = inspect.signature(getattr(LM, name)), inspect.signature(getattr(LanguageModel, name))
        assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
               [(p.name, p.kind, p.default) for p in contract.parameters.values()], name
    code = "import sys, factlab.evaluate.interface; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
