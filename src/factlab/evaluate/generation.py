"""Batched generation for probes: greedy answers and seeded samples at a temperature.

``generate`` is ``LM.generate`` (see ``lm.py``) as a function of (model, tokenizer): each
prompt runs through the model once, its samples are drawn from copies of its key/value cache
with a generator seeded by (seed, prompt) (``decoding.py``), and rows that end leave the
batch. Each generation records whether it ended with EOS within the token budget and how many tokens it
took, so chat-format metrics (does the model learn to stop?) come from the same pass as the
answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from factlab.evaluate.lm import LM, Generation, eos_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["Generation", "eos_ids", "generate"]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[Generation]]:
    """`n` generations per prompt, in the order of `prompts` (see ``LM.generate``).

    temperature 0 means greedy (then `n` must be 1); sampling is seeded by `seed`.
    `batch_size` counts sequences (prompts x n) per ``model.generate`` call.
    """
    return LM(model, tokenizer, batch_size=batch_size).generate(
        prompts, max_new_tokens=max_new_tokens, n=n, temperature=temperature, top_p=top_p, seed=seed)
