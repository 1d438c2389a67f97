"""The one model interface: a causal LM and its tokenizer behind four requests.

Modelled on lm-evaluation-harness's ``LM`` (``lm_eval/api/model.py``) and its Hugging Face
implementation: ``loglikelihood`` scores (context, continuation) pairs, ``loglikelihood_rolling``
scores whole texts in windows (perplexity), ``generate`` continues prompts (greedy or sampled),
and ``complete`` does all a probe needs in one pass over its prompt: the candidates' scores,
the greedy answer and the samples (``generate`` is ``complete`` without candidates). All share
one padding helper (``pad``), one context-length lookup (``max_positions``), one eval-mode
guard (``eval_mode``) and one forward (``LM._forward``). Strings become tokens in
``tokens.py`` only; the key/value-cache code is in ``kvcache.py``, the token-by-token loop,
the sampler and the batch plan in ``decoding.py``. Works with any Hugging Face causal LM,
PEFT-wrapped or not.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers import GenerationConfig
from transformers.generation import LogitsProcessorList

from factlab.errors import FactlabError
from factlab.evaluate.decoding import Sampler, SamplerProcessor, Step, decode, greedy_pick, plan_batches, sample_uniforms
from factlab.evaluate.kvcache import can_extend_rows, keep_rows, make_room, room, select_rows, stack_rows
from factlab.evaluate.tokens import TokenCache, encode, prefix_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.cache_utils import Cache

# Config attributes that hold a model's context length, as transformers and remote-code
# models name it (GPT-2's n_positions is also reachable as max_position_embeddings).
_LENGTH_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest input ``model`` takes, in tokens, from its config; None if the config
    names no limit (models with relative positions only, such as BLOOM's ALiBi).

    Reads the text decoder's config (``get_text_config``), so a multimodal model such as
    Gemma 3, whose top-level config has no length, gives its language model's. A PEFT
    wrapper's ``config`` is its base model's.
    """
    config = model.config
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config(decoder=True)
    for name in _LENGTH_ATTRS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str,
        device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to one (B, T) tensor and its (B, T) attention mask, on ``side``
    ("left" or "right").

    Done here rather than with ``tokenizer.pad`` so that the shared tokenizer's padding side
    is never mutated and tokenizers without a pad token (GPT-2) work too.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[b, span] = torch.tensor(list(s), dtype=torch.long)
        mask[b, span] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; restore the model's train/eval state after
    (evaluation runs between training stages, which must not find dropout silently off)."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


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


class RollingLogLik(NamedTuple):
    """Log-likelihood of a whole text, scored in windows (``LM.loglikelihood_rolling``)."""

    logprob: float
    """Sum of the scored tokens' log-probabilities (natural log, summed in float64)."""
    n_tokens: int
    """Number of scored tokens."""


@dataclass(frozen=True)
class Generation:
    """One generated continuation of a prompt."""

    text: str
    """Decoded new text, special tokens removed, cut at the first EOS."""
    n_tokens: int
    """New tokens up to and including EOS (or the budget, if it never stopped)."""
    ended_with_eos: bool


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS ids of both the tokenizer and the model's generation config (chat models often stop
    on a turn-end token that only one of them names)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def rolling_windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, score_from)`` for a stream of n tokens: window [start, end) scores
    tokens [score_from, end), predicting each from the window's earlier tokens."""
    windows = []
    prev_end = 0
    start = 0
    while True:
        end = min(start + seq_len, n)
        # A window cannot score its own first token (nothing before it in the window), and
        # tokens an earlier window scored are context only.
        score_from = max(prev_end, start + 1)
        if score_from < end:
            windows.append((start, end, score_from))
        if end == n:
            return windows
        prev_end = end
        start += stride


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


class LM:
    """A causal LM and its tokenizer: log-likelihoods of pairs, of whole texts, and generation.

    ``batch_size`` is the number of rows per forward (a method's ``batch_size`` argument
    overrides it for one call). ``share_prefix`` (default True) lets ``loglikelihood`` run
    each distinct context once for all its continuations; False runs every pair whole, the
    reference path. Every request puts the model in eval mode under inference mode and
    restores its train/eval state after.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int = 16, *, share_prefix: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = self._check_batch_size(batch_size)
        self.share_prefix = share_prefix
        self._tokens = TokenCache(tokenizer)  # each distinct text encoded once per LM

    @staticmethod
    def _check_batch_size(batch_size: int) -> int:
        if batch_size < 1:
            raise FactlabError(f"batch_size must be at least 1, got {batch_size}; "
                               "set a positive batch size")
        return batch_size

    # -- what every request needs ----------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the model's parameters (and so its inputs) are."""
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int | None:
        """The model's context length (``max_positions``); None if unlimited."""
        return max_positions(self.model)

    @property
    def pad_id(self) -> int:
        """Id written at padded positions: masked and never read, so any valid id will do."""
        tok = self.tokenizer
        for tid in (tok.pad_token_id, tok.eos_token_id):
            if tid is not None:
                return tid
        return 0

    @property
    def prefix_id(self) -> int:
        """Token that stands in for an empty context or prompt, so the first token has a
        prediction (BOS, else EOS, as lm-eval does; see tokens.prefix_id)."""
        return prefix_id(self.tokenizer)

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
            inputs["logits_to_keep"] = torch.arange(width - keep, width, device=self.device)
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

    # -- loglikelihood: (context, continuation) pairs --------------------------------------

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[LogLik]:
        """Score each (context, continuation) pair; results are in the order of ``pairs``.

        All pairs are tokenized by ``split_pair``; an empty context is scored after
        ``prefix_id``. With ``share_prefix`` (the default), pairs with the same context tokens
        share its forward pass: each distinct context runs once (left-padded batches of
        ``batch_size`` contexts, longest first), the first continuation token is scored from
        the context's last logits and the remaining tokens from its key/value cache, copied
        once per continuation. Without it, or for a model whose cache cannot be reused that
        way (see ``_shares_prefix`` and ``kvcache``), or for a pair too long for the model,
        every pair runs whole, in right-padded batches sorted by length, its oldest context
        dropped if it is too long. Both give the same numbers up to float rounding (tested to
        1e-5).
        """
        self._tokens.prefetch_pairs(list(pairs))
        requests = [self._request(context, continuation) for context, continuation in pairs]
        results: list[LogLik | None] = [None] * len(requests)
        with eval_mode(self.model):
            plain = list(range(len(requests)))
            if self.share_prefix and self._shares_prefix():
                max_len = self.max_length
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
        ctx, cont = self._tokens.split_pair(context, continuation)
        return _Request(tuple(ctx) or (self.prefix_id,), tuple(cont))

    # The plain path: every pair runs whole (the reference, and the fallback)

    def _loglikelihood_plain(self, requests: Sequence[_Request]) -> list[LogLik]:
        """Every request in one forward of its own row; right-padded batches, longest first."""
        inputs = []  # the ids fed to the model: all but the last token (position p predicts p + 1)
        max_len = self.max_length
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
        ids, mask = pad([inp for inp, _ in batch], self.pad_id, "right", self.device)  # (B, T)
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

    # The shared-prefix path: each distinct context runs once

    def _shares_prefix(self) -> bool:
        """Whether the model can continue a left-padded batch from its key/value cache.

        Not for PEFT prompt-learning methods (prompt / prefix / P-tuning): they prepend
        virtual tokens or their own cache, so positions and cache would not line up. Not for
        encoder-decoders, nor for a forward without ``past_key_values`` and ``position_ids``
        (explicit positions are what make left padding exact). The cache the model returns
        is checked in ``_run_contexts``.
        """
        peft_config = getattr(self.model, "active_peft_config", None)
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

        device = self.device
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
        log-probs at the last position; None if the cache can't be copied per row and
        extended (``kvcache.can_extend_rows``)."""
        ids, mask = pad(contexts, self.pad_id, "left", self.device)  # (B, P)
        # Explicit positions: counted from each row's first real token, as if unpadded.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                            use_cache=True, logits_to_keep=1, return_output=True)
        cache = out.past_key_values
        if not can_extend_rows(cache):
            return None
        last = out.logits[:, -1].float().log_softmax(-1)  # (B, V)
        return cache, mask, last

    def _score_continuations(self, cache: Cache, ctx_mask: torch.Tensor,
                             rows: list[tuple[int, tuple[int, ...]]], req_idx: list[int],
                             logprob: torch.Tensor, missed: torch.Tensor) -> None:
        """Score tokens 2.. of each continuation (row b of the context batch, continuation
        ids), feeding all but its last token after a copy of row b's cache. Adds the sums
        and misses into ``logprob`` and ``missed`` at ``req_idx``."""
        device = self.device
        ctx_rows = torch.tensor([b for b, _ in rows], device=device)  # (N,)
        sub = select_rows(cache, ctx_rows)  # (N, heads, P, head_dim) per layer
        ids, cont_mask = pad([cont[:-1] for _, cont in rows], self.pad_id, "right", device)  # (N, W)
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

    # -- loglikelihood_rolling: whole texts in windows -------------------------------------

    def loglikelihood_rolling(self, texts: Sequence[str | Sequence[int]], seq_len: int,
                              stride: int | None = None, *,
                              batch_size: int | None = None) -> list[RollingLogLik]:
        """Log-likelihood of each whole text (a string, encoded by ``tokens.encode``, or token
        ids), scored in windows of ``seq_len`` tokens; in the order of ``texts``.

        - ``stride=None``: non-overlapping windows [0, L), [L, 2L), ... of ``seq_len`` = L
          tokens. Each window's first token is context only (not scored), so one token per
          window boundary is never scored; every other token is scored once.
        - ``stride=s`` (1 <= s <= L): sliding windows starting at 0, s, 2s, ...; each window
          scores only the tokens after the previous window's end, so every token after the
          first is scored exactly once, with at least L - s tokens of context (the Hugging
          Face "perplexity of fixed-length models" scheme). Costs about L / s times as much.

        The first token is never scored (nothing before it), so a text whose tokenizer puts
        a BOS first has every text token scored. Windows of one text go through the model in
        batches of up to ``batch_size`` (default: the LM's), unpadded; log-softmax in fp32 and
        sums in float64, so the result does not depend on the batch size beyond float
        rounding. Raises ``ValueError`` for a bad seq_len/stride and ``FactlabError`` for a
        seq_len beyond the model's context or a text of fewer than 2 tokens.
        """
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        stride = seq_len if stride is None else stride
        if not 1 <= stride <= seq_len:
            raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
        batch_size = self.batch_size if batch_size is None else self._check_batch_size(batch_size)
        max_len = self.max_length
        if max_len is not None and seq_len > max_len:
            raise FactlabError(f"seq_len {seq_len} is longer than the model's context ({max_len} tokens); "
                               f"use seq_len <= {max_len}")
        streams = [encode(self.tokenizer, t) if isinstance(t, str) else list(t) for t in texts]
        plans = [rolling_windows(len(ids), seq_len, stride) for ids in streams]
        if any(not windows for windows in plans):
            raise FactlabError("text is too short to score (needs at least 2 tokens); give a longer text")
        with eval_mode(self.model):
            return [self._rolling(ids, windows, batch_size) for ids, windows in zip(streams, plans)]

    def _rolling(self, ids: list[int], windows: list[tuple[int, int, int]],
                 batch_size: int) -> RollingLogLik:
        """Sum of log-probs (float64) and count over the scored tokens of all windows."""
        total, count = 0.0, 0
        # Only windows of equal length share a batch (no padding): the full windows, then the
        # shorter last one alone. Padding would be correct for a causal model but can change
        # the numbers in the last bits, and the result should not depend on batch_size.
        i = 0
        while i < len(windows):
            length = windows[i][1] - windows[i][0]
            j = i
            while j < len(windows) and j - i < batch_size and windows[j][1] - windows[j][0] == length:
                j += 1
            batch = windows[i:j]
            input_ids = torch.tensor([ids[s:e] for s, e, _ in batch], dtype=torch.long,
                                     device=self.device)  # (B, T)
            logits = self._forward(input_ids=input_ids)  # (B, T, V)
            for b, (start, end, score_from) in enumerate(batch):
                # Position p predicts token p + 1: scored tokens [score_from, end) in stream
                # coordinates come from logits at window positions [score_from-1-start, end-1-start).
                lo, hi = score_from - 1 - start, end - 1 - start
                logp = torch.log_softmax(logits[b, lo:hi].float(), dim=-1)  # (S, V), fp32
                targets = input_ids[b, lo + 1 : hi + 1]  # (S,)
                nll = -logp.gather(-1, targets[:, None]).squeeze(-1)  # (S,)
                total += float(nll.double().sum())
                count += hi - lo
            i = j
        return RollingLogLik(-total, count)

    # -- generate: greedy or sampled continuations of prompts ------------------------------

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int | None = None) -> list[list[Generation]]:
        """``n`` generations per prompt, in the order of ``prompts``.

        Prompts are tokenized by ``tokens.encode`` (special tokens added once; an empty
        prompt becomes ``prefix_id``). Generation stops at any of ``eos_ids``; each result
        records whether it ended with EOS within ``max_new_tokens`` and how many tokens it
        took. temperature 0 means greedy (then ``n`` must be 1). Sampling is seeded per
        prompt (``decoding.sample_uniforms``): the same seed and prompt give the same samples
        whatever else is in the call and whatever the batch size. ``batch_size`` (default:
        the LM's, at least 512) is the most sequences (prompts x n) decoded together: a
        decoding step of a small model multiplies a few rows by every weight, and a CPU does
        that at a fraction of its speed unless there are a few hundred rows. This is
        ``complete`` with prompts only (see there for the two paths).
        """
        if max_new_tokens < 1:
            raise FactlabError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        greedy = temperature <= 0
        if greedy and n != 1:
            raise FactlabError("greedy decoding gives one answer per prompt; set temperature > 0 for n > 1 samples")
        if not greedy and n < 1:
            raise FactlabError(f"n must be at least 1, got {n}")
        requests = [PromptRequest(p, greedy_tokens=max_new_tokens if greedy else 0, samples=0 if greedy else n)
                    for p in prompts]
        out = self.complete(requests, temperature=temperature if not greedy else 1.0, top_p=top_p,
                            sample_tokens=max_new_tokens, seed=seed, gen_batch=batch_size)
        return [[c.greedy] if greedy else c.samples for c in out]  # type: ignore[list-item]

    # -- complete: candidates, a greedy answer and samples per prompt, in one pass ---------

    def complete(self, requests: Sequence[PromptRequest], *, temperature: float = 1.0, top_p: float = 1.0,
                 sample_tokens: int = 24, seed: int = 0, gen_batch: int | None = None) -> list[Completion]:
        """Per request: the log-likelihood of each continuation after its context, its greedy
        answer (``greedy_tokens`` > 0) and its ``samples`` sampled continuations of
        ``sample_tokens`` tokens at ``temperature`` (top-p ``top_p``), in the order of
        ``requests``.

        With ``share_prefix`` (and a model whose cache can be reused, as for
        ``loglikelihood``) every prompt runs through the model once: prompts are batched
        (``decoding.plan_batches``; a prefix that many prompts share, such as the in-context
        baseline's corpus, runs once per batch group), each continuation is scored by one
        forward that extends the batch's key/value cache in place (positions of the other
        candidates are masked), and the greedy answer goes on from there: the first
        continuation's tokens that are the model's argmax are already the first tokens of the
        greedy answer, so decoding starts after them (and is skipped when they fill the
        budget). Then the greedy answers and the samples of all batches (up to a memory
        budget) decode together, at most ``gen_batch`` (default max(512, batch_size)) sequences
        a step; the samples of a prompt share its cache row until they part, and rows that end
        leave. Otherwise (``share_prefix=False``, the reference; other models; a request too
        long for the model) continuations go through ``loglikelihood`` and answers through
        transformers' ``generate``. Both paths give the same scores up to float rounding
        (tested to 1e-5), the same greedy answers and the same samples (see ``decoding``).
        """
        if any(r.samples < 0 or r.greedy_tokens < 0 for r in requests):
            raise FactlabError("greedy_tokens and samples must be 0 (none) or more")
        if any(r.samples for r in requests) and (temperature <= 0 or sample_tokens < 1):
            raise FactlabError("sampling needs temperature > 0 and sample_tokens >= 1; "
                               f"got temperature {temperature}, sample_tokens {sample_tokens}")
        gen_batch = max(512, self.batch_size) if gen_batch is None else self._check_batch_size(gen_batch)
        counts = [r.samples for r in requests]
        sampler = (Sampler(sample_uniforms(seed, [r.prompt for r in requests], counts, sample_tokens),
                           temperature, top_p) if any(counts) else None)
        job = _Job(requests, sample_tokens, sampler, gen_batch)
        with eval_mode(self.model):
            if self.share_prefix and self._shares_prefix():
                self._complete_cached(job)
            rest = [i for i, c in enumerate(job.results) if c is None]
            if rest:
                self._complete_reference(job, rest)
        return job.results  # type: ignore[return-value]

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(context ids, continuation ids) of each pair, as ``loglikelihood`` scores it (an
        empty context becomes ``prefix_id``); tokenized once per LM (``complete`` reuses it)."""
        self._tokens.prefetch_pairs(list(pairs))
        return [tuple(self._request(c, x)) for c, x in pairs]  # type: ignore[misc]

    def _prompt_ids(self, prompts: Sequence[str]) -> list[tuple[int, ...]]:
        """``tokens.encode`` of each prompt, ``prefix_id`` for an empty one."""
        self._tokens.prefetch(list(prompts))
        return [tuple(self._tokens.encode(p)) or (self.prefix_id,) for p in prompts]

    def _generation(self, tokens: Sequence[int], ended: bool) -> Generation:
        """A Generation from its new tokens (a last stop token when ``ended``)."""
        text_ids = list(tokens[:-1]) if ended else list(tokens)
        return Generation(text=self.tokenizer.decode(text_ids, skip_special_tokens=True),
                          n_tokens=len(tokens), ended_with_eos=ended)

    # The reference path: loglikelihood, and transformers' generate

    def _complete_reference(self, job: _Job, idx: list[int]) -> None:
        requests = job.requests
        pairs = [(r.scored_context, c) for i in idx for r in [requests[i]] for c in r.continuations]
        scores = iter(self.loglikelihood(pairs))
        greedy: dict[int, Generation] = {}
        for budget in sorted({requests[i].greedy_tokens for i in idx} - {0}):
            rows = [i for i in idx if requests[i].greedy_tokens == budget]
            for i, (g,) in zip(rows, self._generate_hf([requests[i].prompt for i in rows], budget, 1, job.gen_batch)):
                greedy[i] = g
        sampled: dict[int, list[Generation]] = {}
        for n in sorted({requests[i].samples for i in idx} - {0}):
            rows = [i for i in idx if requests[i].samples == n]
            sampler_rows = [job.offsets[i] + j for i in rows for j in range(n)]
            outs = self._generate_hf([requests[i].prompt for i in rows], job.sample_tokens, n, job.gen_batch,
                                     job.sampler, sampler_rows)
            sampled.update(zip(rows, outs))
        for i in idx:
            job.results[i] = Completion([next(scores) for _ in requests[i].continuations], greedy.get(i),
                                        sampled.get(i, []))

    def _generate_hf(self, prompts: Sequence[str], max_new_tokens: int, n: int, batch_size: int,
                     sampler: Sampler | None = None, sampler_rows: Sequence[int] = ()) -> list[list[Generation]]:
        """``n`` continuations per prompt by transformers' greedy ``generate``, left-padded
        batches of up to ``batch_size`` sequences, longest prompt first. With ``sampler`` the
        n rows of each prompt are sampled (``SamplerProcessor``; ``sampler_rows`` gives the
        sampler row of each (prompt, sample), prompt-major)."""
        encoded = self._prompt_ids(prompts)
        stops = eos_ids(self.model, self.tokenizer)
        # A fresh config, so sampling defaults shipped with the model neither apply nor warn.
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  temperature=None, top_p=None, top_k=None,
                                  eos_token_id=stops or None, pad_token_id=self.pad_id)
        processor = SamplerProcessor(sampler) if sampler is not None else None
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        per_batch = max(1, batch_size // n)
        results: list[list[Generation]] = [[] for _ in encoded]
        for start in range(0, len(order), per_batch):
            idx = order[start:start + per_batch]
            ids, mask = pad([encoded[i] for i in idx], self.pad_id, "left", self.device)  # (B, T)
            rows = torch.arange(len(idx), device=self.device).repeat_interleave(n)  # (B*n,)
            extra = {}
            if processor is not None:
                processor.rows = [sampler_rows[i * n + j] for i in idx for j in range(n)]
                processor.width = ids.shape[1]
                extra["logits_processor"] = LogitsProcessorList([processor])
            out = self.model.generate(input_ids=ids[rows], attention_mask=mask[rows],
                                      generation_config=config, **extra)  # (B*n, T + new)
            for j, row in enumerate(out[:, ids.shape[1]:].tolist()):
                cut = next((k for k, t in enumerate(row) if t in stops), None)
                results[idx[j // n]].append(self._generation(row if cut is None else row[:cut + 1], cut is not None))
        return results

    # The cached path: each prompt runs once

    def _complete_cached(self, job: _Job) -> None:
        """Fill ``job.results`` for the requests the cached path can take (see ``complete``);
        leaves the others None."""
        requests = job.requests
        prompts = self._prompt_ids([r.prompt for r in requests])
        pairs = [(r.scored_context, c) for r in requests for c in r.continuations]
        split = iter(self.tokenize_pairs(pairs))
        conts = [[next(split) for _ in r.continuations] for r in requests]  # (ctx, cont) per candidate
        max_len = self.max_length
        fast = []
        for i, r in enumerate(requests):
            longest = max([r.greedy_tokens, job.sample_tokens if r.samples else 0]
                          + [len(cont) for ctx, cont in conts[i] if ctx == prompts[i]])
            if max_len is None or len(prompts[i]) + longest <= max_len:
                fast.append(i)
        # Continuations scored after another context than the prompt (a BPE merge across the
        # boundary cut the context back): the ordinary loglikelihood, in one call.
        other = [(i, k) for i in fast for k, (ctx, _) in enumerate(conts[i]) if ctx != prompts[i]]
        other_scores = dict(zip(other, self.loglikelihood([(requests[i].scored_context, requests[i].continuations[k])
                                                           for i, k in other]))) if other else {}
        state = _CachedState(job, prompts, conts, other_scores)
        # Cache positions held at once (rows x width): a batch's prompts, and the decoding rows
        # of the batches that wait to decode together. Not more: with long prompts (the
        # in-context corpus) attention reads every row's cache at every step, and twice the
        # positions took a third longer than two halves (a 30-layer model, one thread).
        budget = max(16384, self.batch_size * 1024)
        waiting: list[_Start] = []
        for batch in plan_batches([prompts[i] for i in fast], max_rows=job.gen_batch, max_tokens=budget):
            start = self._run_batch(state, [fast[b] for b in batch.rows], batch.shared)
            if start is None:
                break  # the model's cache cannot be extended this way: the reference path does the rest
            if start.rows:
                if waiting and sum(w.size for w in waiting) + start.size > budget:
                    self._decode(state, waiting)
                    waiting = []
                waiting.append(start)
        if waiting:
            self._decode(state, waiting)

    def _step(self, cache: Cache) -> Step:
        """The decoding step on ``cache`` (see ``decoding.Step``)."""
        def step(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self._forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 past_key_values=cache, use_cache=True)[:, -1]  # (R, V)
        return step

    def _prefill(self, state: _CachedState, idx: list[int], shared: int
                 ) -> tuple[Cache, torch.Tensor, torch.Tensor] | None:
        """One forward over the prompts ``idx``, left-padded so that all end at the last
        position; the first ``shared`` tokens (the same in all) come from a one-row forward
        run once per prefix and copied to every row, the padding sitting between them and
        each prompt's own tokens. Returns the cache, its (B, W) attention mask and the (B, V)
        fp32 logits at the last position; None if the cache cannot be extended."""
        device = self.device
        prompts = [state.prompts[i] for i in idx]
        cache = None
        if shared:
            prefix = prompts[0][:shared]
            if prefix not in state.prefixes:
                ids = torch.tensor([prefix], device=device)  # (1, S)
                out = self._forward(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    position_ids=torch.arange(shared, device=device)[None], use_cache=True,
                                    logits_to_keep=1, return_output=True)
                if not can_extend_rows(out.past_key_values):
                    return None
                state.prefixes = {prefix: out.past_key_values}  # groups come one after another
            cache = select_rows(state.prefixes[prefix], torch.zeros(len(idx), dtype=torch.long, device=device))
        ids, own = pad([p[shared:] for p in prompts], self.pad_id, "left", device)  # (B, T)
        positions = shared + (own.cumsum(-1) - 1).clamp(min=0)  # (B, T): counted from each row's first real token
        mask = torch.cat([torch.ones((len(idx), shared), dtype=own.dtype, device=device), own], dim=1)  # (B, S + T)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=1, return_output=True)
        if not can_extend_rows(out.past_key_values):
            return None
        return out.past_key_values, mask, out.logits[:, -1].float()

    def _run_batch(self, state: _CachedState, idx: list[int], shared: int) -> _Start | None:
        """Score the candidates of the requests ``idx`` from one prefill and set up the
        decoding of their greedy answers and samples (see ``complete``); None if the model's
        cache cannot be used this way (nothing is filled in then)."""
        job, requests, device = state.job, state.job.requests, self.device
        stops = eos_ids(self.model, self.tokenizer)
        ran = self._prefill(state, idx, shared)
        if ran is None:
            return None
        cache, mask, raw = ran  # cache over (B, W); mask (B, W); raw (B, V) fp32
        last = raw.log_softmax(-1)  # (B, V)
        first_pick = raw.argmax(-1).tolist()  # (B,) the greedy first token
        ctx_len = mask.sum(-1)  # (B,) real tokens per row
        B = len(idx)
        # In place: the candidates scored right after the prompt, by candidate index.
        places = [[k for k, (ctx, _) in enumerate(state.conts[i]) if ctx == state.prompts[i]] for i in idx]
        blocks = max((len(requests[i].continuations) for i in idx), default=0)
        widths = [max((len(state.conts[i][k][1]) for b, i in enumerate(idx) if k in places[b]), default=0)
                  for k in range(blocks)]
        spare = sum(widths) + max([requests[i].greedy_tokens for i in idx] + [job.sample_tokens])
        limit = room(cache)
        if limit is not None and mask.shape[1] + spare > limit:
            return _Start(None, mask, ctx_len, raw, [])  # a sliding window would drop keys: the reference path
        make_room(cache, spare)

        # Candidates: block k feeds candidate k of every row after the prompt (all but its last
        # token; the whole first candidate where a greedy answer is wanted, so that the
        # answer can go on from it). Earlier blocks are masked out of later ones.
        logprob = [[0.0] * len(requests[i].continuations) for i in idx]
        missed = [[0] * len(requests[i].continuations) for i in idx]
        accepted = [0] * B  # tokens of the first candidate that are the greedy answer's first tokens
        next_logits = raw.clone()  # (B, V) the logits after the accepted tokens
        block0 = None  # where the first candidate's block starts in the cache
        for k in range(blocks):
            rows = [b for b in range(B) if k in places[b]]
            if not rows:
                continue
            conts = {b: state.conts[idx[b]][k][1] for b in rows}
            for b in rows:
                logprob[b][k] = float(last[b, conts[b][0]])
                missed[b][k] = int(last[b].argmax()) != conts[b][0]
            full = {b for b in rows if k == 0 and requests[idx[b]].greedy_tokens > 0}
            feed = [conts[b] if b in full else conts[b][:-1] for b in rows]
            if not any(feed):
                continue
            by_row = dict(zip(rows, feed))
            ids, block = pad([by_row.get(b, ()) for b in range(B)], self.pad_id, "right", device)  # (B, K)
            positions = ctx_len[:, None] + torch.arange(ids.shape[1], device=device)  # (B, K)
            logits = self._forward(input_ids=ids, attention_mask=torch.cat([mask, block], dim=1),
                                   position_ids=positions, past_key_values=cache, use_cache=True)  # (B, K, V)
            if k == 0:
                block0 = mask.shape[1]
            mask = torch.cat([mask, torch.zeros_like(block)], dim=1)
            # Row b's block position j predicts its candidate token j + 1.
            r_idx, cols, targets = [], [], []
            for b in rows:
                r_idx += [b] * (len(conts[b]) - 1)
                cols += range(len(conts[b]) - 1)
                targets += conts[b][1:]
            if targets:
                sums, misses = _token_scores(logits, r_idx, cols, targets, B)
                for b in rows:
                    logprob[b][k] += sums[b]
                    missed[b][k] += misses[b]
            if full:
                picks = logits.argmax(-1).tolist()  # (B, K) raw argmax, as greedy decoding takes it
                for b in full:
                    cont, a = conts[b], 0
                    while a < len(cont) and cont[a] == (first_pick[b] if a == 0 else picks[b][a - 1]):
                        a += 1
                    accepted[b] = a
                    if a:
                        next_logits[b] = logits[b, a - 1].float()
            del logits
        for b, i in enumerate(idx):
            scores = [LogLik(logprob[b][k], len(state.conts[i][k][1]), missed[b][k] == 0) if k in places[b]
                      else state.other[(i, k)] for k in range(len(requests[i].continuations))]
            job.results[i] = Completion(scores, None, [])

        # Greedy answers: the accepted tokens; decoding goes on after them unless they are
        # the whole answer. Samples: from the prompt (every candidate block masked out).
        greedy_mask = mask.clone()
        rows: list[_Row] = []
        sel: list[int] = []  # the batch row of each decoding cache row
        for b, i in enumerate(idx):
            budget = requests[i].greedy_tokens
            if not budget:
                continue
            tokens = list(state.conts[i][0][1][:min(accepted[b], budget)]) if accepted[b] else []
            stop = next((j for j, t in enumerate(tokens) if t in stops), None)
            if stop is not None or len(tokens) == budget:
                done = tokens if stop is None else tokens[:stop + 1]
                job.results[i] = job.results[i]._replace(greedy=self._generation(done, stop is not None))
                continue
            if block0 is not None:
                greedy_mask[b, block0:block0 + accepted[b]] = 1
            rows.append(_Row(i, -1, len(sel), tokens, budget))
            sel.append(b)
        greedy_rows = len(sel)
        for b, i in enumerate(idx):
            if requests[i].samples:
                rows += [_Row(i, j, len(sel), [], job.sample_tokens) for j in range(requests[i].samples)]
                sel.append(b)
        if not rows:
            return _Start(None, mask, ctx_len, raw, [])
        index = torch.tensor(sel, device=device)
        keep_rows(cache, index)
        ctx_mask = torch.cat([greedy_mask[index[:greedy_rows]], mask[index[greedy_rows:]]])  # (S, W)
        starts = torch.tensor([len(r.started) for r in rows], device=device)  # (R,)
        positions = ctx_len[index].clone()
        logits = torch.cat([next_logits[index[:greedy_rows]], raw[index[greedy_rows:]]])  # (S, V)
        for r, n_started in zip(rows, starts.tolist()):
            if r.sample < 0:
                positions[r.state] += n_started
        return _Start(cache, ctx_mask, positions, logits, rows)

    def _decode(self, state: _CachedState, starts: list[_Start]) -> None:
        """Decode the greedy answers and samples of ``starts`` together: one cache (their rows
        stacked, each left-padded to the widest), at most ``gen_batch`` sequences a step."""
        job, device = state.job, self.device
        if len(starts) > 1:
            spare = max(r.budget for s in starts for r in s.rows)
            stacked = stack_rows([s.cache for s in starts], spare)
            if stacked is None:  # sliding windows: each batch alone
                for s in starts:
                    self._decode(state, [s])
                return
            width = max(s.mask.shape[1] for s in starts)
            mask = torch.cat([torch.nn.functional.pad(s.mask, (width - s.mask.shape[1], 0)) for s in starts])
            offsets = [0]
            for s in starts:
                offsets.append(offsets[-1] + s.mask.shape[0])
            rows = [r._replace(state=r.state + off) for s, off in zip(starts, offsets) for r in s.rows]
            start = _Start(stacked, mask, torch.cat([s.positions for s in starts]),
                           torch.cat([s.logits for s in starts]), rows)
        else:
            start = starts[0]
        sampler = job.sampler
        rows = start.rows
        sampled = [r for r, row in enumerate(rows) if row.sample >= 0]
        sample_rows = {r: job.offsets[rows[r].request] + rows[r].sample for r in sampled}

        def pick(logits: torch.Tensor, states: list[int], rs: list[int], steps: list[int]) -> torch.Tensor:
            out = greedy_pick(logits, states, rs, steps)  # (A,)
            at = [a for a, r in enumerate(rs) if r in sample_rows]
            if at:
                out[at] = sampler(logits, [states[a] for a in at], [sample_rows[rs[a]] for a in at],
                                  [steps[a] for a in at])
            return out

        # Rows that decode together: at most gen_batch sequences (a prompt's samples together).
        groups, current = [], []
        for r, row in enumerate(rows):
            if current and len(current) >= job.gen_batch and rows[current[-1]].state != row.state:
                groups.append(current)
                current = []
            current.append(r)
        groups.append(current)
        for group in groups:
            states = sorted({rows[r].state for r in group})
            index = torch.tensor(states, device=device)
            if len(groups) > 1:
                cache = select_rows(start.cache, index)
            else:
                cache = start.cache
                if len(states) < start.mask.shape[0]:
                    keep_rows(cache, index)
            local = {s: n for n, s in enumerate(states)}
            decoded = decode(self._step(cache), lambda ix, c=cache: keep_rows(c, ix), start.mask[index],
                             start.positions[index], start.logits[index], [rows[r].budget for r in group],
                             lambda logits, st, rs, steps, g=group: pick(logits, st, [g[r] for r in rs], steps),
                             eos_ids(self.model, self.tokenizer), self.pad_id,
                             started=[rows[r].started for r in group], states=[local[rows[r].state] for r in group])
            for r, d in zip(group, decoded):
                row, gen = rows[r], self._generation(d.tokens, d.ended_with_eos)
                if row.sample < 0:
                    job.results[row.request] = job.results[row.request]._replace(greedy=gen)
                else:
                    job.results[row.request].samples.append(gen)
            del cache


@dataclass(frozen=True)
class PromptRequest:
    """One prompt of ``LM.complete``: candidates to score after it, a greedy answer, samples."""

    prompt: str
    """The text the greedy answer and the samples continue."""
    continuations: tuple[str, ...] = ()
    """Scored after ``context``; the greedy answer may start with the first one's tokens."""
    context: str | None = None
    """What the continuations are scored after (default: ``prompt``); ``split_pair`` moves its
    trailing spaces into the continuation, so a context that is the prompt plus trailing
    spaces is scored right after the prompt's tokens."""
    greedy_tokens: int = 0
    """Budget of the greedy answer in new tokens (0: no greedy answer)."""
    samples: int = 0
    """Sampled continuations (settings in ``LM.complete``)."""

    @property
    def scored_context(self) -> str:
        return self.prompt if self.context is None else self.context


class Completion(NamedTuple):
    """What ``LM.complete`` gives for one request."""

    scores: list[LogLik]
    """One per continuation, in order."""
    greedy: Generation | None
    """The greedy answer (None when ``greedy_tokens`` was 0)."""
    samples: list[Generation]


@dataclass
class _Job:
    """One ``LM.complete`` call: its requests, sampling settings and results so far."""

    requests: Sequence[PromptRequest]
    sample_tokens: int
    sampler: Sampler | None
    gen_batch: int
    results: list[Completion | None] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    """The sampler row of each request's first sample."""

    def __post_init__(self):
        self.results = [None] * len(self.requests)
        self.offsets = [0]
        for r in self.requests:
            self.offsets.append(self.offsets[-1] + r.samples)


class _Row(NamedTuple):
    """A sequence to decode: a request's greedy answer (sample -1) or one of its samples."""

    request: int
    sample: int
    state: int
    """Its row in the decoding cache (a prompt's samples share one until they part)."""
    started: list[int]
    budget: int


class _Start(NamedTuple):
    """Where decoding starts for the rows of one prompt batch: its cache (None: nothing to
    decode here), the (S, W) attention mask, the (S,) next positions and (S, V) logits."""

    cache: Cache | None
    mask: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor
    rows: list[_Row]

    @property
    def size(self) -> int:
        """Cache positions it holds (rows x width), as the samples will have parted."""
        return len(self.rows) * self.mask.shape[1]


@dataclass
class _CachedState:
    """What the batches of the cached path share: tokens, scores from other contexts, the
    last shared-prefix cache."""

    job: _Job
    prompts: list[tuple[int, ...]]
    conts: list[list[tuple[tuple[int, ...], tuple[int, ...]]]]
    other: dict[tuple[int, int], LogLik]
    prefixes: dict = field(default_factory=dict)
