"""Shared fixtures: tiny tokenizers and tiny random models, built in the test (no downloads)."""

from __future__ import annotations

import pytest
import torch

from factlab.testing import tiny_model, tiny_tokenizer  # noqa: F401  (re-exported helpers)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def llama(tok):
    torch.manual_seed(0)
    return tiny_model("llama", vocab_size=len(tok))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random llama + tokenizer saved as a local model folder (what `model:` can name)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer()
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d
