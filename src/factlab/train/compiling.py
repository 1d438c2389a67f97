"""`train.compile`: torch.compile of the model's repeated blocks while a stage trains.

Regional compilation (https://pytorch.org/tutorials/recipes/regional_compilation.html): the
decoder layers are one class repeated, so compiling each of them in place costs one
compilation that the others reuse, and the rest of the model (embedding, the fused loss, PEFT's
wrappers outside the layers) stays eager. The compiled calls are undone when the stage ends, so
merging, saving and evaluation see the eager model (a compiled layer would recompile for every
new shape and grad mode of the evaluation).

Off by default: on CPU the first step pays the compilation (tens of seconds for SmolLM2 on 2
cores), which the short stages factlab runs do not win back; bench/bench_training.py measures
it (row `factlab, compile`).
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

BACKEND = "inductor"
"""The torch.compile backend of train.compile (the tests set "eager": traced, no code generated)."""


def repeated_blocks(model) -> list[nn.Module]:
    """The layers of the first ModuleList in `model` made of one class repeated (>= 2)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            return list(module)
    return []


@contextmanager
def compiled_blocks(model, enabled: bool = True, backend: str | None = None):
    """Within the block, `model`'s repeated blocks run compiled (`backend`: a torch.compile
    backend, default BACKEND)."""
    blocks = repeated_blocks(model) if enabled else []
    for block in blocks:
        block.compile(backend=backend or BACKEND)
    try:
        yield blocks
    finally:
        for block in blocks:
            # nn.Module.compile() keeps the compiled call here; there is no public undo.
            block._compiled_call_impl = None
