"""The scoring names other code calls: ``Scorer`` is the model interface ``lm.LM``.

``Scorer(model, tokenizer, batch_size, share_prefix=...).loglikelihood(pairs)`` scores
(context, continuation) pairs (see ``LM.loglikelihood``); the pair tokenization lives in
``tokens.py`` and is re-exported here for callers that import it from this module.
"""

from __future__ import annotations

from factlab.evaluate.lm import LM, LogLik
from factlab.evaluate.tokens import chat_prompt, encode, split_pair, trailing_space

# The same class under the name the scoring step and other branches have always used.
Scorer = LM

__all__ = ["LM", "LogLik", "Scorer", "chat_prompt", "encode", "split_pair", "trailing_space"]
