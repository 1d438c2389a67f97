"""Several processes training one model, data-parallel (`accelerate launch`, `torchrun`).

Each process loads the model and the data, trains on its slice of every batch (the Trainer
and accelerate do the gradient all-reduce), and merges its own copy of the adapter; only the
first process (rank 0) evaluates and writes the run folder and the run store, while the others
wait here. Alone (no WORLD_SIZE above 1 in the environment) every function is a no-op.

`train.batch_size` keeps its meaning whatever the number of processes: it is the global batch
of one optimizer step (before gradient accumulation), split evenly over the processes.

Why factlab joins the process group itself, before the Trainer does: rank 0 evaluates the base
model before the first stage trains, which can take longer than torch's default 30-minute
timeout of a collective; the group is created with a long one (a crashed process still ends
the launch at once: torchrun stops the other workers when one fails).
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import torch

from factlab.errors import FactlabError
from factlab.models.device import world_size

WAIT = timedelta(hours=24)
"""How long a process waits in a collective (rank 0 evaluating while the others wait)."""

_waiting_group = None
"""A gloo group for waiting when the main group is NCCL: a CPU-side wait, not a GPU collective
that keeps a host thread spinning."""


def processes() -> int:
    """Processes training together (1 alone)."""
    return world_size()


def rank() -> int:
    """This process's global rank (0 alone)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    """True in the process that evaluates and writes (rank 0), and when alone."""
    return rank() == 0


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def exit_with_parent(interval: float = 1.0) -> None:
    """End this process soon after the process that started it is gone. A launcher (or a
    sweep) killed with SIGKILL cannot stop its children; without this they would wait in a
    collective for the long timeout, or go on writing a run that a restarted sweep redoes."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="factlab-exit-with-parent", daemon=True).start()


def start(device: torch.device) -> None:
    """Join the launch's process group (gloo on the CPU, NCCL on CUDA GPUs) with a long
    timeout; a no-op when alone or already joined."""
    global _waiting_group
    if processes() <= 1 or _initialized():
        return
    exit_with_parent()
    if not torch.distributed.is_available():
        raise FactlabError("this torch build has no torch.distributed; run factlab in one process")
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type != "cpu":
        raise FactlabError(f"several processes on the {device.type} device are not supported; "
                           "use device: cpu or cuda, or one process")
    torch.distributed.init_process_group(backend=backend, timeout=WAIT)
    if backend != "gloo":
        _waiting_group = torch.distributed.new_group(backend="gloo", timeout=WAIT)


def stop() -> None:
    """Leave the process group (at the end of `factlab run`)."""
    global _waiting_group
    if _initialized():
        torch.distributed.destroy_process_group()
    _waiting_group = None


def barrier() -> None:
    """Wait until every process is here (no-op alone)."""
    if _initialized():
        torch.distributed.barrier(group=_waiting_group)


def broadcast(value):
    """Rank 0's `value` in every process (picklable; alone: `value`)."""
    if not _initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, group=_waiting_group)
    return box[0]


def per_process_batch(batch_size: int, stage: str) -> int:
    """This process's share of a stage's `train.batch_size` (the global batch)."""
    n = processes()
    if batch_size % n:
        raise FactlabError(f"stage '{stage}': train.batch_size {batch_size} is the global batch, split over {n} "
                           f"processes; make it a multiple of {n}")
    return batch_size // n
