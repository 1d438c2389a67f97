"""The one scoring path: tokenization and batched log-likelihoods (generation: generation.py).

Modelled on lm-evaluation-harness: a request is a (context, continuation) pair of strings;
this module alone turns it into tokens, so every probe kind is tokenized the same way. The
continuation carries the word-separating space, and the tokens are split so that
``encode(context) + encode(continuation) == encode(context + continuation)`` (see
``split_pair``). Works with any Hugging Face causal LM and tokenizer.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

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


class _Request(NamedTuple):
    """One pair as tokens: the context (never empty) and the continuation."""

    ctx: tuple[int, ...]
    cont: tuple[int, ...]

    @property
    def width(self) -> int:
        """Tokens the model sees when the pair runs whole (all but the last)."""
        return len(self.ctx) + len(self.cont) - 1


def _token_scores(logits: torch.Tensor, rows: list[int], cols: list[int], targets: list[int],
                  n_rows: int) -> tuple[list[float], list[int]]:
    """Per row of ``logits`` (B, T, V): the sum of log-probs of ``targets`` at (rows, cols)
    and the number of those positions whose argmax is not the target."""
    device = logits.device
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)  # (N,)
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)  # (N,)
    targets_t = torch.tensor(targets, dtype=torch.long, device=device)  # (N,)
    # log_softmax in fp32 over the N scored positions only, not all B*T.
    logprobs = logits[rows_t, cols_t].float().log_softmax(-1)  # (N, V)
    token_lp = logprobs.gather(-1, targets_t[:, None]).squeeze(-1)  # (N,)
    missed = (logprobs.argmax(-1) != targets_t).long()  # (N,)
    sums = torch.zeros(n_rows, dtype=torch.float64, device=device)
    sums.index_add_(0, rows_t, token_lp.double())  # (B,)
    misses = torch.zeros(n_rows, dtype=torch.long, device=device)
    misses.index_add_(0, rows_t, missed)  # (B,)
    return sums.tolist(), misses.tolist()


class Scorer:
    """Batched log-likelihoods and greedy continuations for a causal LM and its tokenizer.

    ``batch_size`` rows per forward. ``share_prefix`` (default True) runs each distinct
    context once for all its continuations (see ``loglikelihood``); False runs every pair
    whole, the reference path.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int = 16, *, share_prefix: bool = True):
        if batch_size < 1:
            raise FactlabError(f"batch_size must be at least 1, got {batch_size}; "
                               "set a positive batch size")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.share_prefix = share_prefix

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

        All pairs are tokenized by ``split_pair``. With ``share_prefix`` (the default), pairs
        with the same context tokens share its forward pass: each distinct context runs once
        (left-padded batches of ``batch_size`` contexts, longest first), the first
        continuation token is scored from the context's last logits and the remaining tokens
        from its key/value cache, copied once per continuation. Without it, or for a model
        whose cache cannot be reused that way (see ``_shares_prefix``), or for a pair too
        long for the model, every pair runs whole, in right-padded batches sorted by length.
        Both give the same numbers up to float rounding (tested to 1e-5).
        """
        requests = [self._request(context, continuation) for context, continuation in pairs]
        results: list[LogLik | None] = [None] * len(requests)
        with _eval_mode(self.model):
            plain = list(range(len(requests)))
            if self.share_prefix and self._shares_prefix():
                max_len = self._max_length
                fits = [i for i in plain if max_len is None or requests[i].width <= max_len]
                shared = self._loglikelihood_shared([requests[i] for i in fits])
                if shared is not None:
                    for i, ll in zip(fits, shared):
                        results[i] = ll
                    plain = [i for i in plain if results[i] is None]
            for i, ll in zip(plain, self._loglikelihood_plain([requests[i] for i in plain])):
                results[i] = ll
        return results  # type: ignore[return-value]

    def _request(self, context: str, continuation: str) -> _Request:
        ctx, cont = split_pair(self.tokenizer, context, continuation)
        return _Request(tuple(ctx) or (self._prefix_id,), tuple(cont))

    # The plain path: every pair runs whole (the reference, and the fallback) ----------------

    def _loglikelihood_plain(self, requests: Sequence[_Request]) -> list[LogLik]:
        """Every request in one forward of its own row; right-padded batches, longest first."""
        inputs = []  # the ids fed to the model: all but the last token (position p predicts p + 1)
        max_len = self._max_length
        for req in requests:
            inp = list(req.ctx + req.cont[:-1])
            if max_len is not None and len(inp) > max_len:
                if len(req.cont) > max_len:
                    raise FactlabError(f"continuation of {len(req.cont)} tokens is longer than the "
                                       f"model's context of {max_len}; shorten the answer")
                inp = inp[-max_len:]  # drop the oldest context, as lm-eval does
            inputs.append(inp)

        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        results: list[LogLik | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = [(inputs[i], list(requests[i].cont)) for i in idx]
            for i, ll in zip(idx, self._score_batch(batch)):
                results[i] = ll
        return results  # type: ignore[return-value]

    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[LogLik]:
        device = self._device
        ids, mask = _pad([inp for inp, _ in batch], self._pad_id, "right", device)  # (B, T)
        # Continuation tokens sit at the end of each row's real tokens (right padding), so
        # row b's m continuation tokens are predicted at positions len(inp)-m .. len(inp)-1.
        rows, cols, targets = [], [], []
        for b, (inp, cont) in enumerate(batch):
            rows += [b] * len(cont)
            cols += range(len(inp) - len(cont), len(inp))
            targets += cont
        # Logits only from the first position any row needs on: (B, K, V), not (B, T, V).
        keep = ids.shape[1] - min(cols)
        logits = self._forward(input_ids=ids, attention_mask=mask, use_cache=False,
                               logits_to_keep=keep)  # (B, K, V)
        offset = ids.shape[1] - logits.shape[1]
        cols = [c - offset for c in cols]
        sums, misses = _token_scores(logits, rows, cols, targets, len(batch))
        return [LogLik(s, len(cont), m == 0) for s, m, (_, cont) in zip(sums, misses, batch)]

    # The shared-prefix path: each distinct context runs once -----------------------------

    def _shares_prefix(self) -> bool:
        """Whether the model can continue a left-padded batch from its key/value cache.

        Not for PEFT prompt-learning methods (prompt / prefix / P-tuning): they prepend
        virtual tokens or their own cache, so positions and cache would not line up. Not for
        encoder-decoders, nor for a forward without ``past_key_values`` and ``position_ids``
        (explicit positions are what make left padding exact). The cache the model returns
        is checked in ``_run_contexts``.
        """
        model = self.model
        peft_config = getattr(model, "active_peft_config", None)
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            return False
        if getattr(self._base_model.config, "is_encoder_decoder", False):
            return False
        params = self._forward_params
        return "past_key_values" in params and "position_ids" in params

    def _loglikelihood_shared(self, requests: Sequence[_Request]) -> list[LogLik] | None:
        """Score requests grouped by context; None if the model's cache can't be reused."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.ctx, []).append(i)
        contexts = sorted(groups, key=len, reverse=True)  # longest first: batches pad little

        device = self._device
        logprob = torch.zeros(len(requests), dtype=torch.float64, device=device)  # (R,)
        missed = torch.zeros(len(requests), dtype=torch.long, device=device)  # (R,)
        for start in range(0, len(contexts), self.batch_size):
            batch = contexts[start:start + self.batch_size]
            ran = self._run_contexts(batch)
            if ran is None:
                return None
            cache, ctx_mask, last = ran  # cache over (B, P); ctx_mask (B, P); last (B, V)

            # The first continuation token is predicted at the context's last position.
            members = [(b, i) for b, ctx in enumerate(batch) for i in groups[ctx]]
            rows_t = torch.tensor([b for b, _ in members], device=device)  # (M,)
            req_t = torch.tensor([i for _, i in members], device=device)  # (M,)
            first_t = torch.tensor([requests[i].cont[0] for _, i in members], device=device)
            logprob.index_add_(0, req_t, last[rows_t, first_t].double())
            missed.index_add_(0, req_t, (last.argmax(-1)[rows_t] != first_t).long())
            del last

            # The other tokens: each continuation (but its last token) runs on a copy of its
            # context's cache, several continuations per forward (widest first).
            rest = sorted((m for m in members if len(requests[m[1]].cont) > 1),
                          key=lambda m: -len(requests[m[1]].cont))
            # Bounded memory: a forward takes at most 4 * batch_size rows (copies of the
            # context cache) and batch_size * (P + 16) input tokens, the logits a plain batch
            # of batch_size rows with 16-token continuations would hold.
            budget = self.batch_size * (ctx_mask.shape[1] + 16)
            while rest:
                width = len(requests[rest[0][1]].cont) - 1
                n = max(1, min(4 * self.batch_size, budget // width))
                chunk, rest = rest[:n], rest[n:]
                self._score_continuations(cache, ctx_mask, [(b, requests[i].cont) for b, i in chunk],
                                          [i for _, i in chunk], logprob, missed)
            del cache

        return [LogLik(float(s), len(req.cont), int(m) == 0)
                for s, m, req in zip(logprob.tolist(), missed.tolist(), requests)]

    def _run_contexts(self, contexts: Sequence[tuple[int, ...]]
                      ) -> tuple[Cache, torch.Tensor, torch.Tensor] | None:
        """One forward over the contexts, left-padded so that they all end at the last
        position. Returns the key/value cache, the (B, P) attention mask and the (B, V)
        log-probs at the last position; None if the cache is of a kind that can't be copied
        per row and extended (only plain and sliding-window dynamic layers can)."""
        ids, mask = _pad(contexts, self._pad_id, "left", self._device)  # (B, P)
        # Explicit positions: counted from each row's first real token, as if unpadded.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                            use_cache=True, logits_to_keep=1, return_output=True)
        cache = out.past_key_values
        if not (isinstance(cache, DynamicCache)
                and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
                        for layer in cache.layers)):
            return None
        last = out.logits[:, -1].float().log_softmax(-1)  # (B, V)
        return cache, mask, last

    def _score_continuations(self, cache: Cache, ctx_mask: torch.Tensor,
                             rows: list[tuple[int, tuple[int, ...]]], req_idx: list[int],
                             logprob: torch.Tensor, missed: torch.Tensor) -> None:
        """Score tokens 2.. of each continuation (row b of the context batch, continuation
        ids), feeding all but its last token after a copy of row b's cache. Adds the sums
        and misses into ``logprob`` and ``missed`` at ``req_idx``."""
        device = self._device
        ctx_rows = torch.tensor([b for b, _ in rows], device=device)  # (N,)
        # Shallow copies of the cache and its layers, then a row selection: selection
        # rebinds each layer's tensors (and the forward's update concatenates), so the
        # context batch's cache stays as it was for the next chunk.
        sub = copy.copy(cache)
        sub.layers = [copy.copy(layer) for layer in cache.layers]
        sub.batch_select_indices(ctx_rows)  # (N, heads, P, head_dim) per layer

        ids, cont_mask = _pad([list(cont[:-1]) for _, cont in rows], self._pad_id, "right",
                              device)  # (N, W)
        mask = torch.cat([ctx_mask[ctx_rows], cont_mask], dim=1)  # (N, P + W)
        # Positions continue each row's context: its real length, then up.
        start = ctx_mask.sum(-1)[ctx_rows]  # (N,)
        positions = start[:, None] + torch.arange(ids.shape[1], device=device)  # (N, W)
        logits = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                               past_key_values=sub, use_cache=True)  # (N, W, V)
        del sub
        # Row r's input position j predicts its continuation token j + 1.
        r_idx, cols, targets = [], [], []
        for r, (_, cont) in enumerate(rows):
            r_idx += [r] * (len(cont) - 1)
            cols += range(len(cont) - 1)
            targets += cont[1:]
        sums, misses = _token_scores(logits, r_idx, cols, targets, len(rows))
        req_t = torch.tensor(req_idx, device=device)
        logprob.index_add_(0, req_t, torch.tensor(sums, dtype=torch.float64, device=device))
        missed.index_add_(0, req_t, torch.tensor(misses, dtype=torch.long, device=device))

    def _forward(self, return_output: bool = False, **inputs):
        """The model's forward, with logits for the last ``logits_to_keep`` positions only
        (all of them for a model without that argument, then sliced). Returns the logits,
        or the whole output."""
        keep = inputs.pop("logits_to_keep", None)
        if keep is not None and self._has_logits_to_keep:
            # As positions, not as the int: an int slices the hidden states to a strided
            # view, and the lm_head matmul over a strided input rounds differently with the
            # memory layout (two copies of one model disagreed by 1e-5); indexing copies.
            width = inputs["input_ids"].shape[1]
            inputs["logits_to_keep"] = torch.arange(width - keep, width, device=self._device)
        out = self.model(**inputs)
        if keep is not None and not self._has_logits_to_keep:
            out.logits = out.logits[:, -keep:]
        return out if return_output else out.logits

    @property
    def _has_logits_to_keep(self) -> bool:
        return "logits_to_keep" in self._forward_params

    @property
    def _base_model(self) -> PreTrainedModel:
        """The transformers model, under a PEFT wrapper if there is one."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def _forward_params(self) -> Mapping[str, inspect.Parameter]:
        # The class's forward, not the instance's: hooks and wrappers may take **kwargs.
        return inspect.signature(type(self._base_model).forward).parameters


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The question as a user turn in the tokenizer's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise FactlabError(f"tokenizer {name!r} has no chat template; qa probes need a chat "
                           "model, or set a chat template on the tokenizer")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
