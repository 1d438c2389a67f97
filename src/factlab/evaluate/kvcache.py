"""Key/value-cache reuse: the only code that depends on transformers' cache classes.

The shared-prompt scoring path (``LM.loglikelihood``) runs each distinct context once and
scores its continuations from copies of the context's cache. That needs a cache whose rows
can be selected and then extended by a forward, which transformers' ``DynamicCache`` with
plain or sliding-window layers allows; other caches (static, quantized, the convolution
states of hybrid models such as LFM2) are refused here, and the caller runs every pair whole.
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
