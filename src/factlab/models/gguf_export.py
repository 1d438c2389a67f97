"""Write a Hugging Face model folder (a run's merged model) as one GGUF file for llama.cpp,
Ollama or LM Studio, with the `gguf` package that llama.cpp itself publishes.

What is written follows llama.cpp's `convert_hf_to_gguf.py`; the file loads in llama.cpp (checked
with xllamacpp, see llama_cpp.py) and transformers' GGUF loader (`modeling_gguf_pytorch_utils.py`,
`integrations/ggml.py`) reads it back too:

- tensor names from gguf's own table (`gguf.get_tensor_name_map`: `token_embd`, `blk.N.attn_q`,
  ..., `output_norm`, `output`), which is also the table transformers inverts when loading;
- Llama q_proj/k_proj rows permuted into llama.cpp's rotary layout (pairs interleaved per head);
  transformers' `LlamaTensorProcessor` undoes the same permutation. Qwen2 is stored unpermuted;
- no `output` tensor when the embeddings are tied (transformers reads its absence as
  `tie_word_embeddings=True`);
- 1-D tensors (norms, biases) stay f32 as llama.cpp keeps them; 2-D weights are f16, Q8_0 or
  Q4_0 (blocks of 32 along a row; a row length not divisible by 32 stays f16), quantized by the
  `gguf` package (`gguf.quants`: numpy ports of llama.cpp's reference `quantize_row_q8_0_ref` /
  `quantize_row_q4_0_ref`, which gguf-py's own tests compare with libggml). In a Q4_0 file the
  matrix that makes the logits (`output`, or the tied `token_embd`) is Q8_0, as llama.cpp's
  quantizer gives it a higher-precision type (Q6_K there, which the `gguf` package cannot
  quantize);
- the byte-level BPE tokenizer as `tokenizer.ggml.model = gpt2` with tokens, token types,
  merges, special ids and the chat template (`gguf.SpecialVocab` reads the last three from the
  folder the way llama.cpp's converter does), `tokenizer.ggml.pre` identified by llama.cpp's own
  hash table (a tokenizer llama.cpp does not know is refused, not written), and
  `add_bos_token`/`add_eos_token` as the tokenizer actually encodes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from factlab.errors import FactlabError

GGUF_TYPES = ("f16", "q8_0", "q4_0")


@dataclass(frozen=True)
class _Arch:
    permute_qk: bool
    """Llama-style rotary permutation of q/k rows (llama.cpp's `LlamaModel.permute`)."""
    rope_dimension_count: bool
    """Write `rope.dimension_count` (= head_dim); transformers maps it to head_dim for llama only."""


# The architectures whose GGUF transformers can read back and whose llama.cpp conversion is a
# rename plus (for llama/mistral) the q/k permutation. Others are refused rather than written wrong.
ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch(permute_qk=True, rope_dimension_count=True),
    "mistral": _Arch(permute_qk=True, rope_dimension_count=True),
    "qwen2": _Arch(permute_qk=False, rope_dimension_count=False),
}


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute: w is (n_head * head_dim, hidden); each
    # head's rows go from [first half | second half] (HF rotate_half) to interleaved pairs.
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`), or None.

    Decided as llama.cpp's converter decides it (`get_vocab_base_pre`): the sha256 of the token
    ids the tokenizer gives for a fixed check text, looked up in llama.cpp's table of known
    tokenizers (llama_cpp_pre.py, copied from the llama.cpp that xllamacpp ships). The hash
    covers the vocabulary and the splitting rules together, so a retrained vocabulary is unknown
    even when its rules are GPT-2's: llama.cpp would not know how to split its text either.
    """
    from factlab.models.llama_cpp_pre import CHECK_TEXT, PRE_TOKENIZERS

    ids = tokenizer.encode(CHECK_TEXT)
    hit = PRE_TOKENIZERS.get(hashlib.sha256(str(ids).encode()).hexdigest())
    return hit[0] if hit else None


def _looks_special(token: str) -> bool:
    # llama.cpp convert_hf_to_gguf.py `does_token_look_special`: added tokens that some
    # tokenizers forget to mark special but llama.cpp must treat as control tokens.
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


@dataclass(frozen=True)
class _Vocab:
    pre: str
    tokens: list
    types: list
    add_bos: bool
    add_eos: bool


def _read_vocab(model_dir: Path, tokenizer, n_vocab: int) -> _Vocab:
    """The byte-level BPE vocabulary as llama.cpp's converter reads it (`get_vocab_base`), or
    FactlabError for a tokenizer that llama.cpp would load wrong. Checked before anything is written."""
    import gguf

    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file():
        raise FactlabError(f"{model_dir} has no tokenizer.json; only fast (tokenizer.json) BPE tokenizers export to GGUF")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    if (tj.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("decoder")):
        raise FactlabError(f"the tokenizer in {model_dir} is not byte-level BPE; GGUF export supports byte-level BPE (gpt2-style) tokenizers only")
    pre = llama_cpp_pre_tokenizer(tokenizer)
    if pre is None:
        from factlab.models.llama_cpp_pre import SOURCE

        raise FactlabError(f"llama.cpp ({SOURCE}) does not know the pre-tokenizer of the tokenizer in {model_dir}, so it "
                           "would refuse or mis-split the file; export a model whose tokenizer llama.cpp's converter knows "
                           "(SmolLM/SmolLM2, Llama 3, Qwen2, GPT-2, Mistral Nemo, ...)")
    # Whether encoding adds BOS/EOS, as the tokenizer does it (transformers is what factlab trained
    # and evaluated with); written explicitly so llama.cpp does not fall back to its own defaults.
    plain = tokenizer("a b", add_special_tokens=False).input_ids
    full = tokenizer("a b").input_ids
    add_bos = tokenizer.bos_token_id is not None and len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    add_eos = tokenizer.eos_token_id is not None and len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    if full != [tokenizer.bos_token_id] * add_bos + plain + [tokenizer.eos_token_id] * add_eos:
        raise FactlabError(f"the tokenizer in {model_dir} adds special tokens other than BOS/EOS ({full} for {plain}), "
                           "which llama.cpp cannot reproduce; GGUF export supports tokenizers that add at most BOS and EOS")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # the embedding is padded beyond the tokenizer: llama.cpp's filler
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special or _looks_special(by_id[i]) else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return _Vocab(pre, tokens, types, add_bos, add_eos)


def _add_tokenizer(writer, model_dir: Path, tokenizer, vocab: _Vocab, n_vocab: int) -> None:
    """Byte-level BPE vocabulary as llama.cpp's converter writes it (`_set_vocab_gpt2`)."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    # Merges, bos/eos/unk/pad ids and the chat template, read the way llama.cpp does.
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    if tokenizer.pad_token_id is not None and "pad" not in special.special_token_ids:
        special.special_token_ids["pad"] = tokenizer.pad_token_id
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_special_token["bos"] = vocab.add_bos
    special.add_special_token["eos"] = vocab.add_eos
    special.add_to_gguf(writer, quiet=True)


def export_gguf(model_dir: Path, out: Path, gguf_type: str = "f16", console: Console | None = None) -> Path:
    """Write the model folder `model_dir` (config.json, safetensors, tokenizer) as a GGUF file.

    `gguf_type`: "f16" (2-D weights in half precision), "q8_0" (8-bit blocks of 32) or "q4_0"
    (4-bit blocks of 32; the logits' matrix 8-bit).
    Returns `out`. Written to a temporary sibling and renamed, so a failure leaves no partial file.
    """
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    console = console or Console(stderr=True)
    if gguf_type not in GGUF_TYPES:
        raise FactlabError(f"unknown GGUF type '{gguf_type}'; use one of: {', '.join(GGUF_TYPES)}")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FactlabError(f"{model_dir} is not a model folder (no config.json); give a run folder or a merged/ folder")
    config = AutoConfig.from_pretrained(model_dir)
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise FactlabError(f"GGUF export supports {', '.join(ARCHITECTURES)} models; {model_dir} is '{config.model_type}'")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n_vocab = int(config.vocab_size)
    vocab = _read_vocab(model_dir, tokenizer, n_vocab)  # refuses before the weights are read or a file is opened
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)  # llama.cpp: no `output` tensor means tied
    n_layers = config.num_hidden_layers
    if state["model.embed_tokens.weight"].shape[0] != n_vocab:
        raise FactlabError(f"{model_dir}: config.json vocab_size {n_vocab} differs from the embedding's {state['model.embed_tokens.weight'].shape[0]} rows")

    gguf_arch = config.model_type if config.model_type != "mistral" else "llama"  # llama.cpp writes mistral as llama
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
    names = gguf.get_tensor_name_map(arch_enum, n_layers)
    out = Path(out)
    from factlab.atomic import staged_file

    # A temporary sibling renamed when complete (and not renamed after a Ctrl-C, even one a
    # finalizer swallowed): an error or an interrupt leaves no partial or complete file.
    with staged_file(out) as tmp:
        _write_gguf(gguf.GGUFWriter(tmp, gguf_arch), model_dir, config, arch, tokenizer, vocab, n_vocab, state, names,
                    gguf_type, console, out)
    return out


def _write_gguf(writer, model_dir: Path, config, arch: _Arch, tokenizer, vocab: _Vocab, n_vocab: int, state: dict,
                names, gguf_type: str, console: Console, out: Path) -> None:
    """Metadata, tokenizer and tensors into `writer` (a GGUFWriter on the temporary file)."""
    import gguf

    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    try:
        writer.add_name(model_dir.parent.name if model_dir.name == "merged" else model_dir.name)
        writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        if arch.rope_dimension_count:
            writer.add_rope_dimension_count(head_dim)
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        writer.add_rope_freq_base(float(theta if theta is not None else getattr(config, "rope_theta", 10000.0)))
        if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
            raise FactlabError(f"{model_dir} uses rope scaling '{rope.get('rope_type')}', which the GGUF export does not write yet")
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(n_vocab)
        ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type]
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, model_dir, tokenizer, vocab, n_vocab)

        for hf_name, w in state.items():
            base, _, suffix = hf_name.rpartition(".")
            gguf_name = names.get_name(base)
            if gguf_name is None:
                raise FactlabError(f"GGUF export: no llama.cpp name for tensor {hf_name} of this {config.model_type} model")
            if arch.permute_qk and base.endswith("self_attn.q_proj") and suffix == "weight":
                w = _permute(w, n_head, n_head)
            elif arch.permute_qk and base.endswith("self_attn.k_proj") and suffix == "weight":
                w = _permute(w, n_head, n_kv)
            name = f"{gguf_name}.{suffix}"
            qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(gguf_type)
            makes_logits = gguf_name == "output" or (tied and gguf_name == "token_embd")
            if qtype == gguf.GGMLQuantizationType.Q4_0 and makes_logits:
                qtype = gguf.GGMLQuantizationType.Q8_0
            if w.ndim == 1:
                writer.add_tensor(name, w.astype(np.float32))
            elif qtype is not None and w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
                q = gguf.quants.quantize(w.astype(np.float32), qtype)
                writer.add_tensor(name, q, raw_dtype=qtype)
            else:
                writer.add_tensor(name, w.astype(np.float16))
        with console.status(f"writing {out.name} ({gguf_type}) ..."):
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
    finally:
        writer.close()


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) read from a GGUF file by transformers alone (dequantized), eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    model.eval()
    return model, tok


F16_LOGPROB_TOL = 0.02
"""What an f16 file must keep in llama.cpp: every candidate token's log-prob within this of the
fp32 transformers model's (and every probe's verdict)."""


def verify_in_llama_cpp(model_dir: Path, gguf_path: Path, probes, n_tokens: int = 8, lora: Path | None = None) -> dict:
    """Load a GGUF export in llama.cpp (xllamacpp) and compare it with the transformers model it
    was exported from, on probes. Returns compare_with_llama_cpp's keys (tokenization and greedy
    continuations of every probe's prompt, `n_tokens` tokens from the same ids) and:

    - "tokens_scored", "token_max_abs": how many candidate tokens were scored and the largest
      |llama.cpp - transformers| of their log-probs, both given the same token ids (the ones
      transformers' tokenizer gives), so it is the weights and the kernels that differ;
    - "correct_before", "correct_after", "correct_same", "greedy_match_same": the probes'
      candidate verdicts and greedy-answer matches, transformers (every probe kind through
      ``LM``) and llama.cpp (every probe kind through ``LlamaCppLM``: its own tokenizer and chat
      template), and on how many probes they are the same.

    With `lora`, llama.cpp runs `gguf_path` plus that adapter GGUF, and `model_dir` should be the
    merged model it must equal.
    """
    from factlab.evaluate.facts import probe_context, probe_requests, probe_rows, score_probes
    from factlab.evaluate.lm import LM
    from factlab.models.llama_cpp import compare_with_llama_cpp
    from factlab.models.llama_cpp_lm import LlamaCppLM
    from factlab.models.loading import load_model

    probes = list(probes)
    if not probes:
        raise FactlabError("no probes to verify the GGUF export on; give probes (JSONL)")
    model, tok = load_model(Path(model_dir))
    out = {"n_tokens": n_tokens}
    if lora is None:
        out.update(compare_with_llama_cpp(model, tok, Path(gguf_path), [probe_context(p, tok) for p in probes], n_tokens))
    rows_ref = score_probes(model, tok, probes)
    lm = LM(model, tok)
    pairs = [(r.scored_context, c) for r in probe_requests(lm, probes) for c in r.continuations]
    with LlamaCppLM(Path(gguf_path), lora=lora) as cpp:
        worst, scored = 0.0, 0
        for ctx, cont in lm.tokenize_pairs(pairs):
            ids = torch.tensor([list(ctx + cont)])
            with torch.no_grad():
                logp = model(ids).logits[0, len(ctx) - 1:-1].float().log_softmax(-1)  # (len(cont), V)
            ref = logp.gather(-1, torch.tensor(cont)[:, None]).squeeze(-1).tolist()
            got = [lp for lp, _ in cpp.token_logprobs(ctx, cont)]
            worst = max([worst] + [abs(a - b) for a, b in zip(ref, got)])
            scored += len(cont)
        rows = probe_rows(probes, cpp.complete(probe_requests(cpp, probes)))
    out.update(tokens_scored=scored, token_max_abs=worst, probes=len(probes),
               correct_before=sum(bool(r["correct"]) for r in rows_ref), correct_after=sum(bool(r["correct"]) for r in rows),
               correct_same=sum(a["correct"] == b["correct"] for a, b in zip(rows_ref, rows)),
               greedy_match_same=sum(a["greedy_match"] == b["greedy_match"] for a, b in zip(rows_ref, rows)))
    return out
