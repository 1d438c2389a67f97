"""Request tokenization: how a (context, continuation) pair and a prompt become token ids.

The one place that turns strings into tokens for scoring and generation, modelled on
lm-evaluation-harness: the continuation carries the word-separating space, and the tokens
are split so that ``encode(context) + encode(continuation) == encode(context + continuation)``
(see ``split_pair``). Needs only the tokenizer, not torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from factlab.errors import FactlabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Characters that end a line. Trailing line breaks stay in the context (see split_pair).
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def trailing_space(text: str) -> int:
    """Length of the run of horizontal whitespace (spaces, tabs, ...) that ends ``text``."""
    n = 0
    for c in reversed(text):
        if not c.isspace() or c in _LINE_BREAKS:
            break
        n += 1
    return n


def _add_special(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    """Whether to let the tokenizer add its default special tokens (BOS) to ``text``.

    Not when the text already starts with the BOS token, as the output of a chat template
    often does: adding it again would give the model a doubled BOS it never saw in training.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's default special tokens, added only once."""
    return list(tokenizer.encode(text, add_special_tokens=_add_special(tokenizer, text)))


def split_pair(tokenizer: PreTrainedTokenizerBase, context: str,
               continuation: str) -> tuple[list[int], list[int]]:
    """Tokenize a pair so that ``ctx + cont == encode(context + continuation)``.

    Trailing spaces of the context move into the continuation ("is " + "Paris" is scored as
    "is" + " Paris"), because BPE tokenizers attach a space to the word after it. Trailing
    line breaks stay in the context: tokenizers keep them as their own tokens, and a chat
    template ends its generation prompt with one that is not part of the answer.

    The whole text and the context are encoded separately with the same special-token
    setting, and the continuation is the tail of the whole beyond the context's tokens. If a
    BPE merge crosses the boundary (the context's tokens are not a prefix of the whole's,
    e.g. context "France i" + continuation "s Paris", where the whole merges " i" + "s"
    into " is"), the context is cut back to the longest common prefix: the merged token
    then counts as part of the continuation, so the continuation may be scored over a little
    more text than it spells, but the invariant above always holds. ``encode`` here means
    the tokenizer's default special tokens (BOS), added once (see ``encode``). Raises
    ``FactlabError`` for an empty continuation.
    """
    n = trailing_space(context)
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not continuation:
        raise FactlabError(f"empty continuation after context {context[-40:]!r}; "
                           "give a non-empty answer text to score")
    add = _add_special(tokenizer, context)
    whole = list(tokenizer.encode(context + continuation, add_special_tokens=add))
    ctx = list(tokenizer.encode(context, add_special_tokens=add))
    k = 0  # longest common prefix of ctx and whole
    while k < min(len(ctx), len(whole)) and ctx[k] == whole[k]:
        k += 1
    ctx, cont = whole[:k], whole[k:]
    if not cont:
        raise FactlabError(f"continuation {continuation!r} encodes to no tokens; "
                           "give answer text the tokenizer can represent")
    return ctx, cont


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The question as a user turn in the tokenizer's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise FactlabError(f"tokenizer {name!r} has no chat template; qa probes need a chat "
                           "model, or set a chat template on the tokenizer")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)


def prefix_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Token that stands in for an empty context or prompt, so the first token of a
    continuation (a whole document) has a prediction: BOS, else EOS, as lm-eval does."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise FactlabError("cannot score a continuation with an empty context: the tokenizer "
                           "has no BOS or EOS token; give a non-empty prompt")
    return tid
