"""The fingerprint of a model: what the replay cache (factlab.data.replay) is keyed by and what
tests compare saved models by; a leaf module so every layer can use it."""

from __future__ import annotations

import json

import torch


def model_fingerprint(model, tokenizer) -> str:
    """sha256 of a model's weights and its tokenizer's vocabulary (what the replay cache is keyed
    by: the same weights sample the same text, whatever folder or file they came from)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        # Raw bytes of any dtype (numpy has no bfloat16).
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()
