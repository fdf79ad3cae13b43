"""A progress display: rich's on a terminal when it is installed (the `bench`
extra), else one plain line per step on stderr (a log file stays readable)."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any


class Progress:
    def __init__(self) -> None:
        self._rich: Any = None
        self._plain: dict[int, list[Any]] = {}
        if not sys.stderr.isatty():
            return
        try:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[now]}"), TimeElapsedColumn(), transient=False,
                console=_stderr_console(),
            )
        except ImportError:
            pass

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.__enter__()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._rich is not None:
            self._rich.__exit__(t, e, tb)

    def task(self, label: str, total: int) -> int:
        if self._rich is not None:
            return int(self._rich.add_task(label, total=total, now=""))
        tid = len(self._plain)
        self._plain[tid] = [label, total, 0]
        return tid

    def say(self, task: int, now: str) -> None:
        if self._rich is not None:
            self._rich.update(task, now=now)
        else:
            label, total, done = self._plain[task]
            print(f"[{label} {done + 1}/{total}] {now}", file=sys.stderr, flush=True)

    def advance(self, task: int) -> None:
        if self._rich is not None:
            self._rich.advance(task)
        else:
            self._plain[task][2] += 1


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr)
