"""Decoding from a key/value cache: the token-by-token loop, seeded sampling, and the plan of
prompt batches that ``LM.complete`` runs.

``decode`` continues many rows of one cache, greedy or sampled, each row with its own token
budget; rows that end (EOS or budget) leave the batch, so a step runs only the rows still
going, and the loop ends when every row has. The model call is passed in (``step``), so this
module needs neither the model nor transformers' cache classes.

Sampling is seeded per prompt, not per batch: ``sample_uniforms`` draws every uniform a
prompt's samples will use from a generator seeded by (seed, prompt text), and ``sample``
turns a row's next-token distribution and one uniform into a token by inverting the
cumulative distribution. The samples of a prompt therefore depend only on the seed, the
prompt and the model, not on which other prompts share its batch or on the batch size, and
transformers' ``generate`` path (``SamplerProcessor``) draws exactly the same tokens as the
cache path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from transformers.generation import LogitsProcessor, TopPLogitsWarper

# step(ids (R, 1), attention mask (R, W + 1), positions (R, 1)) -> next-token logits (R, V):
# one forward of R rows on the decoding cache, which it extends by one position.
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# pick(logits (S, V) per cache row, cache row of each row (A,), row ids (A,), token index of
# each row (A,)) -> tokens (A,)
Pick = Callable[[torch.Tensor, list[int], list[int], list[int]], torch.Tensor]


def greedy_pick(logits: torch.Tensor, states: list[int], rows: list[int], steps: list[int]) -> torch.Tensor:
    """The argmax token of each row, on fp32 logits as transformers' greedy search takes it."""
    return logits.float().argmax(-1)[states]


def prompt_seed(seed: int, prompt: str) -> int:
    """A 63-bit generator seed for the samples of ``prompt`` under ``seed``."""
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_uniforms(seed: int, prompts: Sequence[str], counts: Sequence[int], max_new_tokens: int) -> torch.Tensor:
    """(sum(counts), max_new_tokens) float64 uniforms in [0, 1): the ``counts[p]`` rows of
    prompt p follow those of the prompts before it, column t is the draw for a sample's token
    t; a prompt's rows come from a generator seeded by (seed, prompt) alone."""
    out = torch.empty((sum(counts), max_new_tokens), dtype=torch.float64)
    row = 0
    for prompt, n in zip(prompts, counts):
        if n:
            gen = torch.Generator().manual_seed(prompt_seed(seed, prompt))
            out[row:row + n] = torch.rand((n, max_new_tokens), generator=gen, dtype=torch.float64)
            row += n
    return out


def sample(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float = 1.0,
           states: Sequence[int] | None = None, block: int = 256) -> torch.Tensor:
    """One token per uniform, drawn from softmax(logits / temperature) of its row of ``logits``
    (S, V) (row ``states[i]`` for uniform i, default row i), after top-p filtering as
    transformers' ``TopPLogitsWarper`` does it, by inverse transform of ``uniforms`` (A,) in
    [0, 1): the first token whose cumulative probability exceeds u.

    The cumulative sum is taken in two levels, over blocks of ``block`` tokens and then
    inside the one block that holds u (float64 sums of the fp32 weights): a cumulative sum
    over the whole vocabulary of every row costs more than the rest of a decoding step of a
    small model (and torch.multinomial's exponential draws for every token even more).
    """
    scores = logits.float() / temperature  # (S, V), as TemperatureLogitsWarper
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    n_states, vocab = scores.shape
    weights = scores.sub_(scores.max(-1, keepdim=True).values).exp_()  # (S, V), unnormalised, in place
    n_blocks = -(-vocab // block)
    if n_blocks * block != vocab:
        weights = torch.nn.functional.pad(weights, (0, n_blocks * block - vocab))
    weights = weights.view(n_states, n_blocks, block)
    cdf = weights.sum(-1, dtype=torch.float64).cumsum(-1)  # (S, n_blocks)
    rows = torch.as_tensor(list(states) if states is not None else range(n_states), device=cdf.device)  # (A,)
    cdf = cdf[rows]  # (A, n_blocks)
    x = uniforms.to(cdf.device, torch.float64) * cdf[:, -1]  # (A,)
    b = torch.searchsorted(cdf, x[:, None], right=True).squeeze(-1).clamp(max=n_blocks - 1)  # (A,)
    a = torch.arange(len(rows), device=cdf.device)
    before = torch.where(b > 0, cdf[a, (b - 1).clamp(min=0)], torch.zeros_like(x))  # (A,)
    inside = weights[rows, b]  # (A, block)
    t = torch.searchsorted(inside.double().cumsum(-1), (x - before)[:, None], right=True).squeeze(-1)  # (A,)
    # Rounding can put x past the block's last token: take its last token with any weight.
    t = t.clamp(max=block - 1)
    bad = inside[a, t] <= 0
    if bad.any():
        last = block - 1 - (inside.flip(-1) > 0).long().argmax(-1)  # (A,)
        t = torch.where(bad, last, t)
    return b * block + t


class Sampler:
    """``pick`` for sampled rows: row r's token t comes from ``uniforms[r, t]``."""

    def __init__(self, uniforms: torch.Tensor, temperature: float, top_p: float = 1.0):
        self.uniforms, self.temperature, self.top_p = uniforms, temperature, top_p

    def __call__(self, logits: torch.Tensor, states: list[int], rows: list[int], steps: list[int]) -> torch.Tensor:
        u = self.uniforms[rows, steps]  # (A,)
        return sample(logits, u, self.temperature, self.top_p, states).to(logits.device)


class SamplerProcessor(LogitsProcessor):
    """``Sampler`` inside transformers' greedy ``generate``: draws each row's token as the cache
    path does and leaves it the only finite score, so the argmax picks it. ``rows`` (the
    sampler row of each batch row) and ``width`` (the padded prompt width) are set per batch."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.rows: list[int] = []
        self.width = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.width
        n = len(self.rows)
        tokens = self.sampler(scores, list(range(n)), self.rows, [step] * n)  # (B,)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(n, device=scores.device), tokens] = 0.0
        return out


class Decoded(NamedTuple):
    """One decoded row: its tokens (up to and including EOS) and whether it ended with EOS."""

    tokens: list[int]
    ended_with_eos: bool


def decode(step: Step, keep: Callable[[torch.Tensor], None], mask: torch.Tensor, positions: torch.Tensor,
           logits: torch.Tensor, budgets: Sequence[int], pick: Pick, stops: Sequence[int], pad_id: int,
           started: Sequence[Sequence[int]] | None = None, states: Sequence[int] | None = None) -> list[Decoded]:
    """Continue rows from a cache until each emits a stop token or reaches its budget.

    The cache has S rows (states); ``mask`` (S, W) is its attention mask as it is (0 for
    padding and for positions a row must not see), ``positions`` (S,) the position of each
    state's next token and ``logits`` (S, V) the logits that predict it. Row r continues state
    ``states[r]`` (default: row r has state r); rows that share a state (the n samples of one
    prompt) share its forward as long as they draw the same tokens, and it is copied when they
    part (exact: the same tokens give the same logits). ``budgets`` is the new tokens each row
    may have in all, counting ``started`` (tokens it already has, e.g. a target the scoring
    pass found to be the greedy continuation). ``keep(index)`` rebuilds the cache from its
    rows ``index`` (repeats allowed): to drop the states no row needs once an eighth of the
    cache is such, so later steps run only what is still going; and when states part, with
    ``index`` every row in order followed by the parents of the new states, so a cache that
    can append rows (factlab.evaluate.kvcache) copies only those.
    Returns, per row, its tokens (``started`` included) up to and including the first stop
    token, or ``budgets[r]`` tokens.
    """
    stop_set = set(stops)
    tokens = [list(s) for s in started] if started is not None else [[] for _ in budgets]
    ended = [False] * len(tokens)
    state = list(states) if states is not None else list(range(len(tokens)))  # row -> cache row
    n_cache = mask.shape[0]
    going = [r for r in range(len(tokens)) if len(tokens[r]) < budgets[r]]
    while going:
        new = pick(logits, [state[r] for r in going], going, [len(tokens[r]) for r in going]).tolist()  # (A,)
        for r, t in zip(going, new):
            tokens[r].append(t)
            ended[r] = t in stop_set
        going = [r for r in going if not ended[r] and len(tokens[r]) < budgets[r]]
        if not going:
            break
        # The next states: a cache row and the token its rows just took; rows that took
        # different tokens from one state part.
        nexts: dict[tuple[int, int], int] = {}
        for r in going:
            nexts.setdefault((state[r], tokens[r][-1]), len(nexts))
        parents = [c for c, _ in nexts]
        if len(parents) <= 7 * n_cache // 8:  # many states done: the cache keeps only the rest
            index = torch.tensor(parents, device=mask.device)
            keep(index)
            mask, positions = mask[index], positions[index]
            n_cache = len(parents)
            for r in going:
                state[r] = nexts[(state[r], tokens[r][-1])]
            feed_tokens = [t for _, t in nexts]
        else:  # each state goes on in its own row; rows of ended states get padding
            feed_tokens = [pad_id] * n_cache
            moved: dict[tuple[int, int], int] = {}
            extra: list[int] = []
            seen: set[int] = set()
            for c, t in nexts:
                if c not in seen:  # the first token drawn from a state continues in its row
                    seen.add(c)
                    feed_tokens[c] = t
                else:  # a state parts: its other tokens get rows appended to the cache
                    moved[(c, t)] = n_cache + len(extra)
                    extra.append(c)
                    feed_tokens.append(t)
            if extra:
                index = torch.arange(n_cache + len(extra), device=mask.device)
                index[n_cache:] = torch.tensor(extra, device=mask.device)
                keep(index)
                mask, positions = mask[index], positions[index]
                n_cache += len(extra)
                for r in going:
                    state[r] = moved.get((state[r], tokens[r][-1]), state[r])
        feed = torch.tensor(feed_tokens, dtype=torch.long, device=mask.device)[:, None]  # (S, 1)
        mask = torch.cat([mask, torch.ones((n_cache, 1), dtype=mask.dtype, device=mask.device)], dim=1)
        logits = step(feed, mask, positions[:, None])  # (S, V)
        positions = positions + 1
    return [Decoded(t, e) for t, e in zip(tokens, ended)]


class Batch(NamedTuple):
    """Prompts that run through the model together: their indices and the number of leading
    tokens they all share (run once, then copied to every row; 0 for none)."""

    rows: list[int]
    shared: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def plan_batches(prompts: Sequence[Sequence[int]], max_rows: int, max_tokens: int,
                 min_shared: int = 16) -> list[Batch]:
    """Batches of prompt indices, each prompt in exactly one.

    Prompts that share a prefix of at least ``min_shared`` tokens (the in-context baseline's
    corpus, a chat template's system turn) are grouped, and the group's batches run that
    prefix once. Within a group, and among the prompts that share nothing, prompts go longest
    first (little padding), at most ``max_rows`` per batch and at most ``max_tokens`` cache
    positions (rows x longest prompt) per batch. A shared prefix always leaves every prompt at
    least one token of its own (its last position's logits come from that forward).
    """
    order = sorted(range(len(prompts)), key=lambda i: tuple(prompts[i]))  # shared prefixes meet
    groups: list[tuple[list[int], int]] = []
    for i in order:
        if groups:
            rows, lcp = groups[-1]
            k = common_prefix(prompts[rows[0]], prompts[i])
            if min(k, lcp) >= min_shared:
                groups[-1] = (rows + [i], min(k, lcp))
                continue
        groups.append(([i], len(prompts[i])))
    loose = [i for rows, _ in groups if len(rows) == 1 for i in rows]
    shared = [(rows, min(lcp, min(len(prompts[i]) for i in rows) - 1)) for rows, lcp in groups if len(rows) > 1]
    batches = []
    for rows, k in [(loose, 0)] + shared:
        if not rows:
            continue
        k = k if k >= min_shared else 0
        rows = sorted(rows, key=lambda i: -len(prompts[i]))
        current: list[int] = []
        for i in rows:
            width = len(prompts[current[0]]) if current else len(prompts[i])
            if current and (len(current) >= max_rows or (len(current) + 1) * width > max_tokens):
                batches.append(Batch(current, k))
                current = []
            current.append(i)
        batches.append(Batch(current, k))
    return batches
