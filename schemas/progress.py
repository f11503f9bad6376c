"""Progress for long work, shared by the data stages and the model stages.

A rich progress bar when stderr is a terminal; otherwise (CI, logs, pipes) a plain line at most
every `log_every_s` seconds, so a log file shows progress without carriage-return noise. rich is
imported lazily: this package's contract modules stay pyarrow + pydantic only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _LineReporter:
    def __init__(self, description: str, total: float | None, log_every_s: float) -> None:
        self.description, self.total, self.log_every_s = description, total, log_every_s
        self.completed = 0.0
        self.fields: dict[str, Any] = {}
        self._start = self._last = time.monotonic()

    def advance(self, amount: float = 1, **fields: Any) -> None:
        self.completed += amount
        self.fields.update(fields)
        now = time.monotonic()
        if now - self._last >= self.log_every_s:
            self._last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        done = f"{self.completed:g}" + (f"/{self.total:g}" if self.total else "")
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        rate = self.completed / max(now - self._start, 1e-9)
        print(f"[{self.description}] {done} ({rate:,.0f}/s) {extra}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        self._emit(time.monotonic())


class _RichReporter:
    def __init__(self, progress: Any, task: Any) -> None:
        self._progress, self._task = progress, task

    def advance(self, amount: float = 1, **fields: Any) -> None:
        info = " ".join(f"{k}={v}" for k, v in fields.items())
        self._progress.update(self._task, advance=amount, info=info)


@contextmanager
def progress(description: str, total: float | None = None, log_every_s: float = 10.0) -> Iterator[Any]:
    """`with progress("ingest", total=n) as bar: bar.advance(k, loss=0.3)`."""
    if not sys.stderr.isatty():
        reporter = _LineReporter(description, total, log_every_s)
        try:
            yield reporter
        finally:
            reporter.close()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, transient=False) as bar:
        yield _RichReporter(bar, bar.add_task(description, total=total, info=""))
