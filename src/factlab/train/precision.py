"""Frozen base weights stored in bf16 while a stage trains with bf16 autocast.

Under autocast every frozen fp32 matrix is cast to bf16 on every forward, and the cast copy
is kept for the backward: the base is held twice (fp32 and bf16) and cast again each step.
With `train.bf16_weights` (default on, effective only when bf16 is on) the frozen matrices
(ndim >= 2: Linear / Conv1D weights, embeddings, an untied lm_head) are stored in bf16 for the
stage, so autocast has nothing to cast and the base takes half the memory. What trains stays
fp32: adapter weights, the trained weights of `full`, and with them their gradients and the
optimizer state; 1-D parameters (norms, biases) stay fp32 too. The input embedding's output
is turned back into fp32, so the residual stream stays fp32 as on the autocast path.

The fp32 values are written to a file in the stage's folder before the cast and read back
when the stage has trained and been scored, so what is merged, saved and evaluated afterwards
is exactly the fp32 base (+ the trained change), as without this option.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def frozen_matrices(model) -> dict[str, torch.nn.Parameter]:
    """Frozen fp32 parameters with ndim >= 2, by name (a tied parameter once)."""
    out: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad or p.dtype != torch.float32 or p.dim() < 2 or id(p) in seen:
            continue
        seen.add(id(p))
        out[name] = p
    return out


def _upcast_output(module, args, output):
    return output.float() if output.dtype == torch.bfloat16 else output


@contextmanager
def frozen_weights_in_bf16(model, spill: Path, enabled: bool = True):
    """Within the block the frozen matrices of `model` are bf16 (see the module docstring);
    their fp32 values wait in the file `spill` and are restored, bit for bit, at the end."""
    params = frozen_matrices(model) if enabled else {}
    if not params:
        yield {}
        return
    spill.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: p.detach().contiguous() for name, p in params.items()}, str(spill))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings()
    handle = emb.register_forward_hook(_upcast_output) if emb is not None else None
    try:
        with torch.no_grad():
            for p in params.values():
                p.data = p.data.to(torch.bfloat16)
        yield params
    finally:
        if handle is not None:
            handle.remove()
        with torch.no_grad(), safe_open(str(spill), framework="pt") as f:
            for name, p in params.items():
                p.data = f.get_tensor(name)
        spill.unlink(missing_ok=True)
