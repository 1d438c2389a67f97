"""Key/value-cache reuse: the only code that depends on transformers' cache classes.

The cached engine (``engine``, behind ``LM.loglikelihood``, ``complete`` and ``generate``)
copies a shared prefix (the in-context corpus) to every row, extends a prompt batch's cache
in place with candidate blocks and generated tokens, draws samples from row copies, and drops
rows that have ended (``keep_rows``). That needs a cache whose rows can be selected and then
extended by a forward, which transformers' ``DynamicCache`` with plain or sliding-window
layers allows (``room`` says how wide a sliding window lets a row grow); other caches
(static, quantized, the convolution states of hybrid models such as LFM2) are refused here,
and the caller runs every pair whole and generates with transformers' ``generate``.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


def can_extend_rows(cache: object) -> bool:
    """Whether ``cache`` can be copied per row (``select_rows``) and extended by a forward."""
    return (isinstance(cache, DynamicCache)
            and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer, _GrowingLayer) for layer in cache.layers))


def select_rows(cache: Cache, rows: torch.Tensor) -> Cache:
    """A cache holding rows ``rows`` (N,) of ``cache`` (may repeat rows), leaving ``cache``
    as it was: for a (B, heads, P, head_dim) layer the copy's is (N, heads, P, head_dim).

    Shallow copies of the cache and its layers, then a row selection: the selection rebinds
    each copied layer's tensors (and a forward's update concatenates new ones), so the
    original cache can be selected from again for the next chunk of continuations.
    """
    sub = copy.copy(cache)
    sub.layers = [copy.copy(layer) for layer in cache.layers]
    sub.batch_select_indices(rows)
    return sub


def keep_rows(cache: Cache, rows: torch.Tensor) -> None:
    """Keep only rows ``rows`` (N,) of ``cache``, in place: finished sequences leave a
    decoding batch, and the forwards after it run on the rows still going. ``rows`` may
    repeat rows; when it is every row in order followed by copies of some (samples of one
    prompt that part), a ``make_room`` layer appends just those copies."""
    for layer in cache.layers:
        if isinstance(layer, _GrowingLayer):
            layer.keep(rows)
        else:
            layer.batch_select_indices(rows)


def room(cache: Cache) -> int | None:
    """How many positions a row of ``cache`` may hold in all before a sliding-window layer
    drops its oldest keys (None: no such layer). The probe path lays candidate blocks and
    generated tokens side by side in one cache, so its width must stay within this."""
    windows = [layer.sliding_window for layer in cache.layers if isinstance(layer, DynamicSlidingWindowLayer)]
    return min(windows) - 1 if windows else None


class _GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are the first positions of larger buffers: a
    forward writes its new positions into the spare room instead of concatenating the whole
    cache (``DynamicLayer.update`` copies every key and value of the layer at every step, which
    for a decoding batch of a few hundred rows costs a fifth of the step). The buffers may also
    have spare rows: ``keep`` appends copies of rows there (samples that part) instead of
    gathering the whole layer, which cost a quarter of a sampled evaluation (profiled on the
    Korrin demo's base model: 540 full-layer gathers, 19 of 71 s)."""

    def __init__(self, layer: DynamicLayer | None, spare: int, keys: list[torch.Tensor] | None = None,
                 values: list[torch.Tensor] | None = None):
        """Room for ``spare`` more positions after ``layer``'s, or after the rows of ``keys`` and
        ``values`` (lists of (B_i, heads, W_i, head_dim)) stacked, each left-padded with zeros
        to the widest."""
        super().__init__()
        keys, values = (keys, values) if layer is None else ([layer.keys], [layer.values])
        self.dtype, self.device, self.is_initialized = keys[0].dtype, keys[0].device, True
        self._n = max(k.shape[-2] for k in keys)
        self._rows = sum(k.shape[0] for k in keys)  # rows in use; the buffers may have more
        self._keys = self._buffer(keys, self._n + spare)
        self._values = self._buffer(values, self._n + spare)
        self._views()

    def _buffer(self, parts: list[torch.Tensor], size: int) -> torch.Tensor:
        """The parts' rows one after another, right-aligned at position ``_n``, in a buffer of ``size`` positions."""
        first = parts[0]
        buf = first.new_empty((sum(p.shape[0] for p in parts), *first.shape[1:-2], size, first.shape[-1]))
        row = 0
        for p in parts:
            width = min(p.shape[-2], self._n)
            if width < self._n:
                buf[row:row + p.shape[0], ..., :self._n - width, :] = 0
            buf[row:row + p.shape[0], ..., self._n - width:self._n, :] = p[..., :width, :]
            row += p.shape[0]
        return buf

    def _views(self) -> None:
        self.keys = self._keys[:self._rows, ..., :self._n, :]
        self.values = self._values[:self._rows, ..., :self._n, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        t = key_states.shape[-2]
        if self._n + t > self._keys.shape[-2]:  # out of room: twice the size (a copy, as a concatenation)
            size = max(self._n + t, 2 * self._keys.shape[-2])
            self._keys = self._buffer([self._keys[:self._rows]], size)
            self._values = self._buffer([self._values[:self._rows]], size)
        self._keys[:self._rows, ..., self._n:self._n + t, :] = key_states
        self._values[:self._rows, ..., self._n:self._n + t, :] = value_states
        self._n += t
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._n

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("factlab's decoding cache is never cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._keys = self._keys[:self._rows].repeat_interleave(repeats, 0)
        self._values = self._values[:self._rows].repeat_interleave(repeats, 0)
        self._rows *= repeats
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """New buffers with rows ``indices`` (a copy: ``select_rows`` relies on it)."""
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._rows = len(indices)
        self._views()

    def keep(self, indices: torch.Tensor) -> None:
        """Rows ``indices``, in place. Every row in order followed by copies of some: the
        copies' positions in use go into spare rows of the buffers (twice the rows when they
        run out); anything else gathers new buffers."""
        rows = self._rows
        if len(indices) <= rows or not torch.equal(indices[:rows], torch.arange(rows, device=indices.device)):
            self.batch_select_indices(indices)
            return
        extra, total = indices[rows:], len(indices)
        if total > self._keys.shape[0]:
            grow = max(total, 2 * self._keys.shape[0])
            self._keys, self._values = self._more_rows(self._keys, grow), self._more_rows(self._values, grow)
        n = self._n
        self._keys[rows:total, ..., :n, :] = self._keys[extra, ..., :n, :]
        self._values[rows:total, ..., :n, :] = self._values[extra, ..., :n, :]
        self._rows = total
        self._views()

    def _more_rows(self, buf: torch.Tensor, rows: int) -> torch.Tensor:
        """``buf`` with room for ``rows`` rows; the rows and positions in use copied."""
        out = buf.new_empty((rows, *buf.shape[1:]))
        out[:self._rows, ..., :self._n, :] = buf[:self._rows, ..., :self._n, :]
        return out


def make_room(cache: Cache, spare: int) -> None:
    """Give every plain layer of ``cache`` (in place) room for ``spare`` more positions per row,
    so that forwards after this write their keys and values into it instead of copying the
    layer (beyond the room it still grows, by doubling). Sliding-window layers stay as they are.
    Rows copied from the cache (``select_rows``) and rows kept (``keep_rows``) keep the room."""
    cache.layers = [_GrowingLayer(layer, spare) if type(layer) is DynamicLayer and layer.keys is not None
                    and layer.keys.numel() else layer for layer in cache.layers]


def stack_rows(caches: list[Cache], spare: int) -> Cache | None:
    """One cache with the rows of ``caches`` one after another, each left-padded with zero
    keys and values to the widest (the caller masks the padding), with room for ``spare``
    more positions (``make_room``): the rows of several prompt batches then decode together.
    None if a layer has a sliding window (padding would count against it)."""
    if any(type(layer) not in (DynamicLayer, _GrowingLayer) for c in caches for layer in c.layers):
        return None
    out = copy.copy(caches[0])
    out.layers = [_GrowingLayer(None, spare, keys=[c.layers[i].keys for c in caches],
                                values=[c.layers[i].values for c in caches])
                  for i in range(len(caches[0].layers))]
    return out
