"""GGUF out (factlab export) and in (model: file.gguf), round-tripped through transformers only."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
import yaml
from cli_helpers import run_cli

from factlab.errors import FactlabError
from factlab.models.gguf_export import export_gguf, load_gguf
from factlab.models.loading import load_model, resolve_model
from factlab.testing import tiny_model, tiny_tokenizer

PROMPTS = ["Juliet was in love with Bob.", "The capital of France is Paris", "0123 Marta Ilvane runs the press line"]
# Stated tolerance of an f16 export: next-token log-probs within 2e-3 of the fp32 model
# (tiny random models; SmolLM2-135M measured in the README).
F16_TOL = 2e-3


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
    with pytest.raises(FactlabError, match="f16, q8_0"):
        export_gguf(d, tmp_path / "x.gguf", "q4_k")
    assert not (tmp_path / "x.gguf").exists()


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


def test_folder_with_gguf_quantization_config_is_refused(tmp_path):
    d, _, _ = _save(tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FactlabError, match="quantization_config"):
        resolve_model(str(d))


# ------------------------------------------------------------------------------- factlab export


def test_export_cli_writes_the_stage_and_verifies_it(tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tuned.gguf"
    code, stdout, err = run_cli(monkeypatch, capsys, "export", tiny_run, "--gguf", out, "--verify")
    assert code == 0, err
    assert "verdict same on 2/2" in stdout and out.is_file()
    diff = float(stdout.split("next-token log-prob max |diff| ")[1].split(",")[0])
    assert diff < F16_TOL
    # the exported file is the stage's merged model, not the base model
    merged, tok = load_model(tiny_run / "stages" / "1-cpt" / "merged")
    base, _ = load_model(resolve_model(str(tiny_run.parent.parent / "model")))
    back, _ = load_gguf(out)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    assert (_logprobs(merged, ids) - _logprobs(back, ids)).abs().max() < F16_TOL
    assert (_logprobs(base, ids) - _logprobs(back, ids)).abs().max() > 10 * F16_TOL


def test_export_cli_errors_are_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    for args, expected in [
        (["--stage", "nope"], "no finished stage 'nope'; choose one of: base, cpt"),
        (["--type", "q4"], "--type must be one of f16, q8_0"),
    ]:
        code, _, err = run_cli(monkeypatch, capsys, "export", tiny_run, "--gguf", tmp_path / "x.gguf", *args)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.gguf").exists()
