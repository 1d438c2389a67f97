"""The one scoring path: tokenization, batched log-likelihoods and greedy generation.

Modelled on lm-evaluation-harness: a request is a (context, continuation) pair of strings;
this module alone turns it into tokens, so every probe kind is tokenized the same way. The
continuation carries the word-separating space, and the tokens are split so that
``encode(context) + encode(continuation) == encode(context + continuation)`` (see
``split_pair``). Works with any Hugging Face causal LM and tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers import GenerationConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from factlab.errors import FactlabError

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


class LogLik(NamedTuple):
    """Log-likelihood of one continuation given its context."""

    logprob: float
    """Sum of the continuation tokens' log-probabilities (natural log)."""
    n_tokens: int
    """Number of continuation tokens."""
    is_greedy: bool
    """Every continuation token is the model's argmax at its position."""

    @property
    def mean_logprob(self) -> float:
        """Log-probability per token (compares candidates of different token lengths)."""
        return self.logprob / self.n_tokens


def _pad(seqs: Sequence[list[int]], pad_id: int, side: str,
         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to one (B, T) tensor and its attention mask, on ``side``.

    Done here rather than with ``tokenizer.pad`` so that the shared tokenizer's padding side
    is never mutated and tokenizers without a pad token (GPT-2) work too.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[b, span] = torch.tensor(s, dtype=torch.long)
        mask[b, span] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def _eval_mode(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode and no autograd for the block; restore the model's train/eval state after
    (scoring runs between training stages, which must not find dropout silently off)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


class Scorer:
    """Batched log-likelihoods and greedy continuations for a causal LM and its tokenizer."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int = 16):
        if batch_size < 1:
            raise FactlabError(f"batch_size must be at least 1, got {batch_size}; "
                               "set a positive batch size")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    # -- token ids the model needs ------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _pad_id(self) -> int:
        # Padded positions are masked and never read, so any valid id will do.
        tok = self.tokenizer
        for tid in (tok.pad_token_id, tok.eos_token_id):
            if tid is not None:
                return tid
        return 0

    @property
    def _prefix_id(self) -> int:
        """Token that stands in for an empty context, so the first token has a prediction."""
        tok = self.tokenizer
        tid = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if tid is None:
            raise FactlabError("cannot score a continuation with an empty context: the tokenizer "
                               "has no BOS or EOS token; give a non-empty prompt")
        return tid

    @property
    def _max_length(self) -> int | None:
        cfg = self.model.config
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            if isinstance(getattr(cfg, name, None), int):
                return getattr(cfg, name)
        return None

    # -- log-likelihoods -----------------------------------------------------------------

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[LogLik]:
        """Score each (context, continuation) pair; results are in the order of ``pairs``.

        All pairs are tokenized by ``split_pair``, sorted by length (longest first, so each
        batch pads little) and run in right-padded batches of ``batch_size``.
        """
        requests = []  # (input ids fed to the model, continuation ids)
        for context, continuation in pairs:
            ctx, cont = split_pair(self.tokenizer, context, continuation)
            full = (ctx or [self._prefix_id]) + cont
            # The model sees all but the last token; position p predicts token p + 1.
            inp = full[:-1]
            max_len = self._max_length
            if max_len is not None and len(inp) > max_len:
                if len(cont) > max_len:
                    raise FactlabError(f"continuation of {len(cont)} tokens is longer than the "
                                       f"model's context of {max_len}; shorten the answer")
                inp = inp[-max_len:]  # drop the oldest context, as lm-eval does
            requests.append((inp, cont))

        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
        results: list[LogLik | None] = [None] * len(requests)
        with _eval_mode(self.model):
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                for i, ll in zip(idx, self._score_batch([requests[i] for i in idx])):
                    results[i] = ll
        return results  # type: ignore[return-value]

    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[LogLik]:
        device = self._device
        ids, mask = _pad([inp for inp, _ in batch], self._pad_id, "right", device)  # (B, T)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)

        # Continuation tokens sit at the end of each row's real tokens (right padding), so
        # row b's m continuation tokens are predicted at positions len(inp)-m .. len(inp)-1.
        rows, cols, targets = [], [], []
        for b, (inp, cont) in enumerate(batch):
            rows += [b] * len(cont)
            cols += range(len(inp) - len(cont), len(inp))
            targets += cont
        rows_t = torch.tensor(rows, device=device)  # (N,)
        targets_t = torch.tensor(targets, device=device)  # (N,)
        # log_softmax in fp32 over the N continuation positions only, not all B*T.
        cols_t = torch.tensor(cols, device=device)  # (N,)
        logprobs = logits[rows_t, cols_t].float().log_softmax(-1)  # (N, V)
        del logits
        token_lp = logprobs.gather(-1, targets_t[:, None]).squeeze(-1)  # (N,)
        missed = (logprobs.argmax(-1) != targets_t).long()  # (N,)
        del logprobs

        sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
        sums.index_add_(0, rows_t, token_lp.double())  # (B,)
        misses = torch.zeros(len(batch), dtype=torch.long, device=device)
        misses.index_add_(0, rows_t, missed)  # (B,)
        return [LogLik(float(s), len(cont), int(m) == 0)
                for s, m, (_, cont) in zip(sums.tolist(), misses.tolist(), batch)]

    # -- greedy generation ---------------------------------------------------------------

    def _eos_ids(self) -> list[int]:
        """EOS ids of both the tokenizer and the model's generation config (chat models
        often stop on a turn-end token that only one of them names)."""
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        return sorted(i for i in ids if i is not None)

    def generate_greedy(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuation of each prompt (left-padded batches), decoded without special
        tokens and cut at the first EOS; in the order of ``prompts``."""
        if max_new_tokens < 1:
            raise FactlabError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        encoded = [encode(self.tokenizer, p) or [self._prefix_id] for p in prompts]
        eos = self._eos_ids()
        # A fresh config, so sampling defaults shipped with the model (temperature, top_p)
        # neither apply nor warn.
        gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      eos_token_id=eos or None, pad_token_id=self._pad_id)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: list[str] = [""] * len(encoded)
        with _eval_mode(self.model):
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                # Left padding: every row's next token is then predicted at the last position.
                ids, mask = _pad([encoded[i] for i in idx], self._pad_id, "left", self._device)
                out = self.model.generate(input_ids=ids, attention_mask=mask,
                                          generation_config=gen_config)  # (B, T + new)
                for i, row in zip(idx, out[:, ids.shape[1]:].tolist()):
                    cut = next((j for j, t in enumerate(row) if t in eos), len(row))
                    results[i] = self.tokenizer.decode(row[:cut], skip_special_tokens=True)
        return results


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The question as a user turn in the tokenizer's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise FactlabError(f"tokenizer {name!r} has no chat template; qa probes need a chat "
                           "model, or set a chat template on the tokenizer")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
