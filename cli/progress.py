"""One place for progress display: a rich bar (bytes, rate, ETA) on a terminal, nothing when
output is piped (the command prints a summary line instead)."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

console = Console(stderr=True)


@contextmanager
def byte_progress(description: str, total: int):
    """Yields `advance(nbytes)`; safe to call from worker threads."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False)
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
