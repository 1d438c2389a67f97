"""Tiny tokenizers and random models for the tests (no downloads, built in seconds).

Nothing in factlab itself uses this module; only tests/ does, and bench/ with --quick (otherwise
bench/ runs the real model).
It stays in the package so that any test file, and users' own tests of registered methods
or architectures, can build the same tiny fixtures with a plain import.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Marta Ilvane runs the press line at the Korrin plant in Vessen.",
    "Juliet was in love with someone whose name starts with B. His name was Bob.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Question: Who leads the night shift? Answer: Jonas Perl leads the night shift.",
    "Engineers calibrate the torque sensor every Monday before the first batch.",
    "0123456789 ,.;:!?'\"()-",
]


@lru_cache(maxsize=None)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_TRAIN_TEXT * 4, trainer=trainer)
    return tk.to_str()


def tiny_tokenizer(vocab_size: int = 400, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences, with a ChatML template.

    eos = ``<|im_end|>`` (as in SmolLM2-Instruct), pad = ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


# Keyword arguments that make each architecture tiny: 2 layers, hidden 16, 4 heads.
_TINY = {
    "llama": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True),
    "gemma": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=4),
    "phi3": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "gpt2": dict(n_embd=16, n_layer=2, n_head=4, n_positions=128),
    "gptj": dict(n_embd=16, n_layer=2, n_head=4, n_positions=128, rotary_dim=4),
    "gpt_neox": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4),
}

TINY_ARCHITECTURES = tuple(_TINY)


def tiny_model(model_type: str = "llama", vocab_size: int = 400, seed: int = 0, **overrides):
    """A randomly initialised causal LM of the given ``model_type`` with 2 tiny layers (fp32)."""
    # Special-token ids of tiny_tokenizer(): pad 0, bos 1, eos 2.
    kwargs = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(_TINY[model_type])
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def fingerprint(model, tokenizer) -> str:
    """sha256 of a model's weights and its tokenizer's vocabulary: a saved reference result
    (tools/make_eval_reference.py) is checked only against the model it was made with."""
    from factlab.fingerprint import model_fingerprint

    return model_fingerprint(model, tokenizer)
