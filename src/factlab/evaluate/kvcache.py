"""Key/value-cache reuse: the only code that depends on transformers' cache classes.

The shared-prompt scoring path (``LM.loglikelihood``) runs each distinct context once and
scores its continuations from copies of the context's cache; the one-pass probe path
(``LM.complete``) copies a shared prefix (the in-context corpus) to every row, draws samples
from row copies, extends a prompt batch's cache in place with candidate blocks and generated
tokens, and drops rows that have ended (``keep_rows``). That needs a cache whose rows can be
selected and then extended by a forward, which transformers' ``DynamicCache`` with plain or
sliding-window layers allows (``room`` says how wide a sliding window lets a row grow); other
caches (static, quantized, the convolution states of hybrid models such as LFM2) are refused
here, and the caller runs every pair whole and generates with transformers' ``generate``.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


def can_extend_rows(cache: object) -> bool:
    """Whether ``cache`` can be copied per row (``select_rows``) and extended by a forward."""
    return (isinstance(cache, DynamicCache)
            and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers))


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
    decoding batch, and the forwards after it run on the rows still going."""
    cache.batch_select_indices(rows)


def room(cache: Cache) -> int | None:
    """How many positions a row of ``cache`` may hold in all before a sliding-window layer
    drops its oldest keys (None: no such layer). The probe path lays candidate blocks and
    generated tokens side by side in one cache, so its width must stay within this."""
    windows = [layer.sliding_window for layer in cache.layers if isinstance(layer, DynamicSlidingWindowLayer)]
    return min(windows) - 1 if windows else None
