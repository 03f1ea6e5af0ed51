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


class TransferDisplay:
    """One bar for a whole push or pull: bytes, rate, ETA and blobs done/total."""

    def __init__(self, description: str):
        self.description = description
        self._progress = None
        self._task = None
        self._blobs = 0
        self._total_blobs = 0

    def __enter__(self):
        if sys.stderr.isatty():
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(),
                                      TextColumn("{task.fields[blobs]}"), console=console)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, total_bytes: int, total_blobs: int) -> None:
        self._total_blobs = total_blobs
        if self._progress is not None:
            self._task = self._progress.add_task(self.description, total=total_bytes,
                                                 blobs=f"0/{total_blobs} blobs")

    def advance(self, nbytes: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, nbytes)

    def blob_done(self) -> None:
        self._blobs += 1
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, blobs=f"{self._blobs}/{self._total_blobs} blobs")
