"""Where a model runs: the experiment's `device` (auto | cpu | cuda | mps) as a torch device,
and whether that device computes bf16.

`auto` takes a GPU when torch sees one (CUDA first, then Apple's MPS), else the CPU. Under a
multi-process launch (`accelerate launch`, `torchrun`) each process takes the GPU of its local
rank (LOCAL_RANK), as the Trainer does.

Everything downstream follows the model: the stage trains where the model is, the scorer
(evaluate.lm.LM) puts its inputs on the model's device, generation too.
"""

from __future__ import annotations

import os

import torch

from factlab.errors import FactlabError

DEVICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def resolve_device(setting: str = "auto") -> torch.device:
    """The torch device of a `device:` setting; FactlabError when the device asked for is not
    there. CUDA: the GPU of this process's local rank under a multi-process launch, else cuda:0."""
    if setting not in DEVICES:
        raise FactlabError(f"device {setting!r} is not one of {', '.join(DEVICES)}; pick one")
    cuda = torch.cuda.is_available()
    if setting == "auto":
        setting = "cuda" if cuda else "mps" if mps_available() else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "mps":
        if not mps_available():
            raise FactlabError("device: mps, but torch sees no Apple GPU (MPS); set device: auto or cpu")
        return torch.device("mps")
    if not cuda:
        raise FactlabError("device: cuda, but torch sees no CUDA GPU (a CPU-only torch build, or no driver); "
                           "set device: auto or cpu")
    if world_size() > 1:
        rank, n = _local_rank(), torch.cuda.device_count()
        if rank >= n:
            raise FactlabError(f"the process of local rank {rank} has no GPU (torch sees {n}); launch at most {n} "
                               "processes per machine")
        return torch.device("cuda", rank)
    return torch.device("cuda", 0)


def world_size() -> int:
    """Processes of a multi-process launch (WORLD_SIZE, set by accelerate launch and torchrun); 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def check_training_device(device: torch.device) -> None:
    """FactlabError when one process would train on a machine with several visible GPUs: the
    Trainer would wrap the model in DataParallel and multiply the batch by the GPU count."""
    if device.type != "cuda" or world_size() > 1:
        return
    n = torch.cuda.device_count()
    if n > 1:
        raise FactlabError(f"torch sees {n} GPUs but factlab trains in one process here; use one GPU with "
                           "CUDA_VISIBLE_DEVICES=0, or all of them with `accelerate launch --num_processes "
                           f"{n} -m factlab run ...` (README: one GPU, several GPUs, several machines)")


def gpu_has_bf16(device: torch.device) -> bool:
    """True when a GPU computes bf16: CUDA with bf16 support (Ampere or newer), MPS on macOS
    14 or newer. False for the CPU (see factlab.train.bf16_probe for that)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "mps":
        backend = torch.backends.mps
        return bool(getattr(backend, "is_macos_or_newer", lambda *a: False)(14, 0))
    return False
