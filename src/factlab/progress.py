"""The one rich progress bar of factlab, for every layer (stages, sweeps, influence rows,
replay sampling): a leaf module, so the data layer can show one without importing train."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(console: Console | None, *columns) -> Progress:
    """The one rich progress bar of factlab (stages, sweeps, influence rows): description, bar,
    done/total, any extra `columns`, elapsed and remaining time. Shown on a terminal, or
    anywhere with FACTLAB_PROGRESS=1 (e.g. a log file)."""
    console = console or Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *columns,
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
                    disable=not console.is_terminal and os.environ.get("FACTLAB_PROGRESS") != "1")
