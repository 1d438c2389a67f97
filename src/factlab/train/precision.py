"""A stage's precision: the policy that resolves `train.bf16` for the device
(`resolve_precision`; on the CPU `cpu_precision`, with factlab.train.bf16_probe), and frozen
base weights stored in bf16 while a stage trains with bf16 autocast (`frozen_weights_in_bf16`).

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

from factlab.errors import FactlabError
from factlab.models.device import gpu_has_bf16
from factlab.train import distributed
from factlab.train.bf16_probe import CpuChoice, cpu_bf16_choice, linear_shapes


def cpu_precision(setting: bool | str, model=None) -> CpuChoice:
    """`train.bf16` resolved on the CPU. true / false as given; `auto`: fp32 without native
    bf16, else bf16 where a short probe at `model`'s Linear shapes (cached per CPU and model)
    finds it faster by a margin (factlab.train.bf16_probe); without a model, by the flag alone.
    With several processes the first one decides (one measurement, one precision for all)."""
    if setting != "auto":
        return CpuChoice(bool(setting), f"train.bf16: {str(bool(setting)).lower()}", "setting")
    shapes = linear_shapes(model) if model is not None else None
    if distributed.processes() > 1 and shapes:
        choice = distributed.broadcast(cpu_bf16_choice(shapes) if distributed.is_main() else None)
        if choice is not None:
            return choice
    return cpu_bf16_choice(shapes)


def use_bf16(setting: bool | str, model=None) -> bool:
    """`train.bf16` resolved on the CPU (see cpu_precision)."""
    return cpu_precision(setting, model).bf16


def resolve_precision(setting: bool | str, device: torch.device, model=None) -> tuple[str, str | None]:
    """`train.bf16` resolved for the device the model is on: ("bf16", "fp16" or "fp32", why or
    None). The weights stay fp32; bf16 and fp16 are autocast. CPU: as cpu_precision (the
    reason says why). GPU: bf16 where the GPU computes it; `auto` falls back to fp16 autocast
    (with loss scaling) elsewhere; false is fp32."""
    if device.type == "cpu":
        choice = cpu_precision(setting, model)
        return ("bf16" if choice.bf16 else "fp32"), choice.reason
    if setting is False:
        return "fp32", None
    if gpu_has_bf16(device):
        return "bf16", None
    if setting == "auto":
        return "fp16", None
    raise FactlabError(f"train.bf16: true, but this {device.type} device does not compute bf16; "
                       "set bf16: auto (fp16 autocast there) or false")


def stage_precision(setting: bool | str, device: torch.device, model=None) -> str:
    """"bf16", "fp16" or "fp32": resolve_precision without the reason."""
    return resolve_precision(setting, device, model)[0]


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
