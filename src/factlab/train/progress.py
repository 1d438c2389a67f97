"""What a stage shows and measures while it trains: a rich progress bar with loss and tokens/s,
and the process's peak resident memory."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, TextColumn
from transformers import TrainerCallback

from factlab.progress import progress_bar  # noqa: F401  (the stage's bar; re-exported for its callers)


class RichProgress(TrainerCallback):
    """A rich progress bar with loss and tokens/s (tokens = non-padding input tokens)."""

    def __init__(self, console: Console, label: str):
        self.console, self.label = console, label
        self.progress: Progress | None = None
        self.task = None
        self.t0 = 0.0
        self.loss = float("nan")

    def on_train_begin(self, args, state, control, **kw):
        self.progress = progress_bar(self.console, TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"))
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=state.max_steps, loss=float("nan"), tps=0.0)
        self.t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.loss = logs["loss"]

    def on_step_end(self, args, state, control, **kw):
        tps = state.num_input_tokens_seen / max(time.perf_counter() - self.t0, 1e-9)
        self.progress.update(self.task, completed=state.global_step, loss=self.loss, tps=tps)

    def on_train_end(self, args, state, control, **kw):
        if self.progress:
            self.progress.stop()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (VmHWM), so a stage can report its
    own peak. Linux only; False where it is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident memory since the last reset_peak_rss (MB; Linux, else None)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
