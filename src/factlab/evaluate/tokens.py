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
    return TokenCache(tokenizer).split_pair(context, continuation)


class TokenCache:
    """``encode`` and ``split_pair`` for one batch of requests, each distinct text encoded
    once: the candidates of a probe share its context, and the in-context baseline puts one
    long corpus before every prompt, so the same texts come back many times. ``prefetch``
    encodes many texts in one batched tokenizer call. Results equal the functions'."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self._ids: dict[tuple[str, bool], list[int]] = {}  # (text, add special tokens) -> ids

    def _encode(self, text: str, add: bool) -> list[int]:
        key = (text, add)
        if key not in self._ids:
            self._ids[key] = list(self.tokenizer.encode(text, add_special_tokens=add))
        return self._ids[key]

    def encode(self, text: str) -> list[int]:
        """``encode(tokenizer, text)``."""
        return list(self._encode(text, _add_special(self.tokenizer, text)))

    def prefetch(self, texts: list[str]) -> None:
        """What ``encode`` will need for every text, in one batched tokenizer call."""
        self._prefetch(texts, [_add_special(self.tokenizer, t) for t in texts])

    def _prefetch(self, texts: list[str], add: list[bool]) -> None:
        """Encode every (text, add-special-tokens) not yet known, in one batched call per flag."""
        for flag in (True, False):
            todo = list(dict.fromkeys(t for t, a in zip(texts, add) if a == flag and (t, flag) not in self._ids))
            if todo:
                batch = self.tokenizer(todo, add_special_tokens=flag)["input_ids"]
                self._ids.update({(t, flag): list(ids) for t, ids in zip(todo, batch)})

    def prefetch_pairs(self, pairs: list[tuple[str, str]]) -> None:
        """Encode what ``split_pair`` will need for every pair, batched (see ``prefetch``)."""
        texts, add = [], []
        for context, continuation in pairs:
            context, continuation = _move_space(context, continuation)
            flag = _add_special(self.tokenizer, context)
            texts += [context, context + continuation]
            add += [flag, flag]
        self._prefetch(texts, add)

    def split_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``split_pair(tokenizer, context, continuation)``."""
        context, continuation = _move_space(context, continuation)
        if not continuation:
            raise FactlabError(f"empty continuation after context {context[-40:]!r}; "
                               "give a non-empty answer text to score")
        add = _add_special(self.tokenizer, context)
        whole = self._encode(context + continuation, add)
        ctx = self._encode(context, add)
        k = 0  # longest common prefix of ctx and whole
        while k < min(len(ctx), len(whole)) and ctx[k] == whole[k]:
            k += 1
        ctx, cont = whole[:k], whole[k:]
        if not cont:
            raise FactlabError(f"continuation {continuation!r} encodes to no tokens; "
                               "give answer text the tokenizer can represent")
        return ctx, cont


def _move_space(context: str, continuation: str) -> tuple[str, str]:
    """The context's trailing horizontal spaces moved to the front of the continuation."""
    n = trailing_space(context)
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


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
