"""The one cached engine: prompts run through the model once, and everything after them comes
from their key/value cache.

A request (``Row``) is a prompt in tokens, the continuations to score right after it, a
greedy answer budget and a number of samples. ``run`` batches the prompts
(``decoding.plan_batches``; a prefix that many prompts share, such as the in-context
baseline's corpus or a chat system turn, runs once per batch group and is copied to every
row), and per batch:

1. prefill: one forward over the batch's prompts, left-padded so that all end at the last
   position (explicit positions make the padding exact); the first token of every
   continuation is scored from the last logits;
2. candidates: block k feeds continuation k of every row (all but its last token) in one
   forward that extends the batch's cache in place; the positions of earlier blocks are
   masked out of later ones. A row's first continuation is fed whole when a greedy answer
   is wanted: its tokens that are the model's argmax are the answer's first tokens, so the
   answer goes on after them (and is done if they fill its budget);
3. decoding: the greedy answers and the samples of several batches (up to a memory budget)
   decode together (``decoding.decode``); the samples of a prompt share its cache row until
   they part, and rows that end leave.

``LM.loglikelihood`` runs it with continuations only (each distinct context a prompt),
``LM.complete`` and ``LM.generate`` with answers too. The cache code is in ``kvcache``. What
the engine cannot take (``run`` leaves it None) goes to the reference path (``reference``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from factlab.evaluate.decoding import Sampler, Step, decode, greedy_pick, plan_batches
from factlab.evaluate.hfmodel import HFModel, pad, token_scores
from factlab.evaluate.interface import Completion, LogLik
from factlab.evaluate.kvcache import can_extend_rows, keep_rows, make_room, room, select_rows, stack_rows

if TYPE_CHECKING:
    from transformers.cache_utils import Cache


class Row(NamedTuple):
    """One prompt of the engine, in tokens."""

    prompt: tuple[int, ...]
    conts: Sequence[tuple[int, ...] | None] = ()
    """Continuations scored right after the prompt, by candidate index; None for one the
    caller scores elsewhere (after another context): it keeps its index free."""
    greedy_tokens: int = 0
    samples: int = 0
    first_sample: int = 0
    """The sampler row of its first sample."""


def run(hf: HFModel, rows: Sequence[Row], *, max_rows: int, budget: int, sample_tokens: int = 0,
        sampler: Sampler | None = None) -> list[Completion | None]:
    """The ``Completion`` of each row (a None score where its continuation was None), or None
    for a row the engine cannot take: every row from the first batch on for a model whose
    cache cannot be copied per row and extended, and the rows of a batch that a sliding window
    cannot hold. ``max_rows`` bounds the rows a step runs (prompts per prefill, sequences per
    decoding step), ``budget`` the cache positions (rows x width) held at once; samples are
    ``sample_tokens`` long and drawn by ``sampler``. The caller holds the model in
    ``eval_mode`` and checks that every row fits the model's context."""
    return _Engine(hf, rows, max_rows, budget, sample_tokens, sampler).run()


class _Decoding(NamedTuple):
    """A sequence to decode: a row's greedy answer (sample -1) or one of its samples."""

    row: int
    sample: int
    state: int
    """Its row in the decoding cache (a prompt's samples share one until they part)."""
    started: list[int]
    budget: int


class _Start(NamedTuple):
    """Where decoding starts for the sequences of one prompt batch: its cache, the (S, W)
    attention mask, the (S,) next positions and (S, V) logits of its S cache rows."""

    cache: Cache
    mask: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor
    seqs: list[_Decoding]

    @property
    def size(self) -> int:
        """Cache positions it holds (sequences x width), as the samples will have parted."""
        return len(self.seqs) * self.mask.shape[1]


class _CannotCache(Exception):
    """The model's cache cannot be copied per row and extended: no batch can run here."""


class _TooWide(Exception):
    """A sliding window would drop keys of this batch's candidates and answers."""


class _Engine:
    """One ``run``: its rows, the results so far and the last shared-prefix cache."""

    def __init__(self, hf: HFModel, rows: Sequence[Row], max_rows: int, budget: int, sample_tokens: int,
                 sampler: Sampler | None):
        self.hf, self.rows, self.max_rows, self.budget = hf, rows, max_rows, budget
        self.sample_tokens, self.sampler = sample_tokens, sampler
        self.results: list[Completion | None] = [None] * len(rows)
        self.prefixes: dict[tuple[int, ...], Cache] = {}

    def run(self) -> list[Completion | None]:
        # Cache positions held at once (rows x width): a batch's prompts, and the decoding
        # rows of the batches that wait to decode together. Not more: with long prompts (the
        # in-context corpus) attention reads every row's cache at every step, and twice the
        # positions took a third longer than two halves (a 30-layer model, one thread).
        waiting: list[_Start] = []
        for batch in plan_batches([r.prompt for r in self.rows], max_rows=self.max_rows, max_tokens=self.budget):
            try:
                start = self._run_batch(batch.rows, batch.shared)
            except _CannotCache:
                break
            except _TooWide:
                continue
            if start is not None:
                if waiting and sum(w.size for w in waiting) + start.size > self.budget:
                    self._decode(waiting)
                    waiting = []
                waiting.append(start)
        if waiting:
            self._decode(waiting)
        return self.results

    def _prefill(self, idx: list[int], shared: int) -> tuple[Cache, torch.Tensor, torch.Tensor]:
        """One forward over the prompts of rows ``idx``, left-padded so that all end at the
        last position; the first ``shared`` tokens (the same in all) come from a one-row
        forward run once per prefix and copied to every row, the padding sitting between them
        and each prompt's own tokens. Returns the cache, its (B, W) attention mask and the
        (B, V) fp32 logits at the last position."""
        hf, device = self.hf, self.hf.device
        prompts = [self.rows[i].prompt for i in idx]
        cache = None
        if shared:
            prefix = prompts[0][:shared]
            if prefix not in self.prefixes:
                ids = torch.tensor([prefix], device=device)  # (1, S)
                out = hf.forward(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 position_ids=torch.arange(shared, device=device)[None], use_cache=True,
                                 logits_to_keep=1, return_output=True)
                if not can_extend_rows(out.past_key_values):
                    raise _CannotCache
                self.prefixes = {prefix: out.past_key_values}  # groups come one after another
            cache = select_rows(self.prefixes[prefix], torch.zeros(len(idx), dtype=torch.long, device=device))
        ids, own = pad([p[shared:] for p in prompts], hf.pad_id, "left", device)  # (B, T)
        positions = shared + (own.cumsum(-1) - 1).clamp(min=0)  # (B, T): counted from each row's first real token
        mask = torch.cat([torch.ones((len(idx), shared), dtype=own.dtype, device=device), own], dim=1)  # (B, S + T)
        out = hf.forward(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1, return_output=True)
        if not can_extend_rows(out.past_key_values):
            raise _CannotCache
        return out.past_key_values, mask, out.logits[:, -1].float()

    def _run_batch(self, idx: list[int], shared: int) -> _Start | None:
        """Score the continuations of rows ``idx`` from one prefill and set up the decoding of
        their greedy answers and samples; None if nothing is left to decode (every result is
        filled in then). Raises ``_CannotCache`` or ``_TooWide`` before filling anything in."""
        rows, hf, device = self.rows, self.hf, self.hf.device
        cache, mask, raw = self._prefill(idx, shared)  # cache over (B, W); mask (B, W); raw (B, V) fp32
        last = raw.log_softmax(-1)  # (B, V)
        first_pick = raw.argmax(-1).tolist()  # (B,) the greedy first token
        ctx_len = mask.sum(-1)  # (B,) real tokens per row
        B = len(idx)
        conts = [rows[i].conts for i in idx]
        blocks = max((len(c) for c in conts), default=0)
        widths = [max((len(c[k]) for c in conts if k < len(c) and c[k] is not None), default=0)
                  for k in range(blocks)]
        spare = sum(widths) + max([rows[i].greedy_tokens for i in idx] + [self.sample_tokens])
        limit = room(cache)
        if limit is not None and mask.shape[1] + spare > limit:
            raise _TooWide  # the caller's reference path takes these rows
        make_room(cache, spare)

        # Candidates: block k feeds candidate k of every row after the prompt (all but its last
        # token; the whole first candidate where a greedy answer is wanted, so that the
        # answer can go on from it). Earlier blocks are masked out of later ones.
        logprob = [[0.0] * len(c) for c in conts]
        missed = [[0] * len(c) for c in conts]
        accepted = [0] * B  # tokens of the first candidate that are the greedy answer's first tokens
        next_logits = raw.clone()  # (B, V) the logits after the accepted tokens
        block0 = None  # where the first candidate's block starts in the cache
        for k in range(blocks):
            here = {b: conts[b][k] for b in range(B) if k < len(conts[b]) and conts[b][k] is not None}
            if not here:
                continue
            for b, cont in here.items():
                logprob[b][k] = float(last[b, cont[0]])
                missed[b][k] = int(last[b].argmax()) != cont[0]
            full = {b for b in here if k == 0 and rows[idx[b]].greedy_tokens > 0}
            feed = {b: cont if b in full else cont[:-1] for b, cont in here.items()}
            if not any(feed.values()):
                continue
            ids, block = pad([feed.get(b, ()) for b in range(B)], hf.pad_id, "right", device)  # (B, K)
            positions = ctx_len[:, None] + torch.arange(ids.shape[1], device=device)  # (B, K)
            logits = hf.forward(input_ids=ids, attention_mask=torch.cat([mask, block], dim=1),
                                position_ids=positions, past_key_values=cache, use_cache=True)  # (B, K, V)
            if k == 0:
                block0 = mask.shape[1]
            mask = torch.cat([mask, torch.zeros_like(block)], dim=1)
            # Row b's block position j predicts its candidate token j + 1.
            spans = [(b, 0, cont[1:]) for b, cont in here.items()]
            if any(len(cont) > 1 for cont in here.values()):
                sums, misses = token_scores(logits, spans, B)
                for b in here:
                    logprob[b][k] += sums[b]
                    missed[b][k] += misses[b]
            if full:
                picks = logits.argmax(-1).tolist()  # (B, K) raw argmax, as greedy decoding takes it
                for b in full:
                    cont, a = here[b], 0
                    while a < len(cont) and cont[a] == (first_pick[b] if a == 0 else picks[b][a - 1]):
                        a += 1
                    accepted[b] = a
                    if a:
                        next_logits[b] = logits[b, a - 1].float()
            del logits
        for b, i in enumerate(idx):
            scores = [LogLik(logprob[b][k], len(c), missed[b][k] == 0) if c is not None else None
                      for k, c in enumerate(conts[b])]
            self.results[i] = Completion(scores, None, [])  # type: ignore[arg-type]
        return self._decoding_start(idx, cache, mask, raw, next_logits, ctx_len, accepted, block0)

    def _decoding_start(self, idx: list[int], cache: Cache, mask: torch.Tensor, raw: torch.Tensor,
                        next_logits: torch.Tensor, ctx_len: torch.Tensor, accepted: list[int],
                        block0: int | None) -> _Start | None:
        """The greedy answers go on after their accepted tokens (done if those are the whole
        answer); the samples start from the prompt (every candidate block masked out). None if
        nothing is left to decode."""
        rows, device, stops = self.rows, self.hf.device, self.hf.stops
        greedy_mask = mask.clone()
        seqs: list[_Decoding] = []
        sel: list[int] = []  # the batch row of each decoding cache row
        for b, i in enumerate(idx):
            budget = rows[i].greedy_tokens
            if not budget:
                continue
            tokens = list(rows[i].conts[0][:min(accepted[b], budget)]) if accepted[b] else []  # type: ignore[index]
            stop = next((j for j, t in enumerate(tokens) if t in stops), None)
            if stop is not None or len(tokens) == budget:
                done = tokens if stop is None else tokens[:stop + 1]
                self.results[i] = self.results[i]._replace(greedy=self.hf.generation(done, stop is not None))
                continue
            if block0 is not None:
                greedy_mask[b, block0:block0 + accepted[b]] = 1
            seqs.append(_Decoding(i, -1, len(sel), tokens, budget))
            sel.append(b)
        greedy_rows = len(sel)
        for b, i in enumerate(idx):
            if rows[i].samples:
                seqs += [_Decoding(i, j, len(sel), [], self.sample_tokens) for j in range(rows[i].samples)]
                sel.append(b)
        if not seqs:
            return None
        index = torch.tensor(sel, device=device)
        keep_rows(cache, index)
        ctx_mask = torch.cat([greedy_mask[index[:greedy_rows]], mask[index[greedy_rows:]]])  # (S, W)
        starts = torch.tensor([len(s.started) for s in seqs], device=device)  # (R,)
        positions = ctx_len[index].clone()
        logits = torch.cat([next_logits[index[:greedy_rows]], raw[index[greedy_rows:]]])  # (S, V)
        for s, n_started in zip(seqs, starts.tolist()):
            if s.sample < 0:
                positions[s.state] += n_started
        return _Start(cache, ctx_mask, positions, logits, seqs)

    def _step(self, cache: Cache) -> Step:
        """The decoding step on ``cache`` (see ``decoding.Step``)."""
        def step(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self.hf.forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                                   past_key_values=cache, use_cache=True)[:, -1]  # (R, V)
        return step

    def _decode(self, starts: list[_Start]) -> None:
        """Decode the greedy answers and samples of ``starts`` together: one cache (their rows
        stacked, each left-padded to the widest), at most ``max_rows`` sequences a step."""
        device = self.hf.device
        if len(starts) > 1:
            spare = max(s.budget for st in starts for s in st.seqs)
            stacked = stack_rows([s.cache for s in starts], spare)
            if stacked is None:  # sliding windows: each batch alone
                for s in starts:
                    self._decode([s])
                return
            width = max(s.mask.shape[1] for s in starts)
            mask = torch.cat([torch.nn.functional.pad(s.mask, (width - s.mask.shape[1], 0)) for s in starts])
            offsets = [0]
            for s in starts:
                offsets.append(offsets[-1] + s.mask.shape[0])
            seqs = [q._replace(state=q.state + off) for s, off in zip(starts, offsets) for q in s.seqs]
            start = _Start(stacked, mask, torch.cat([s.positions for s in starts]),
                           torch.cat([s.logits for s in starts]), seqs)
        else:
            start = starts[0]
        sampler = self.sampler
        seqs = start.seqs
        sample_rows = {r: self.rows[q.row].first_sample + q.sample for r, q in enumerate(seqs) if q.sample >= 0}

        def pick(logits: torch.Tensor, states: list[int], rs: list[int], steps: list[int]) -> torch.Tensor:
            out = greedy_pick(logits, states, rs, steps)  # (A,)
            at = [a for a, r in enumerate(rs) if r in sample_rows]
            if at:
                out[at] = sampler(logits, [states[a] for a in at], [sample_rows[rs[a]] for a in at],
                                  [steps[a] for a in at])
            return out

        # Sequences that decode together: at most max_rows (a prompt's samples together).
        groups, current = [], []
        for r, q in enumerate(seqs):
            if current and len(current) >= self.max_rows and seqs[current[-1]].state != q.state:
                groups.append(current)
                current = []
            current.append(r)
        groups.append(current)
        for group in groups:
            states = sorted({seqs[r].state for r in group})
            index = torch.tensor(states, device=device)
            if len(groups) > 1:
                cache = select_rows(start.cache, index)
            else:
                cache = start.cache
                if len(states) < start.mask.shape[0]:
                    keep_rows(cache, index)
            local = {s: n for n, s in enumerate(states)}
            decoded = decode(self._step(cache), lambda ix, c=cache: keep_rows(c, ix), start.mask[index],
                             start.positions[index], start.logits[index], [seqs[r].budget for r in group],
                             lambda logits, st, rs, steps, g=group: pick(logits, st, [g[r] for r in rs], steps),
                             self.hf.stops, self.hf.pad_id,
                             started=[seqs[r].started for r in group], states=[local[seqs[r].state] for r in group])
            for r, d in zip(group, decoded):
                q, gen = seqs[r], self.hf.generation(d.tokens, d.ended_with_eos)
                done = self.results[q.row]
                if q.sample < 0:
                    self.results[q.row] = done._replace(greedy=gen)
                else:
                    done.samples.append(gen)
            del cache

