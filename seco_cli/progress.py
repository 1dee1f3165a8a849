"""Progress reporting handed to stages by the CLI; the library itself never prints."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]: ...


class Silent:
    """No output (library default, tests)."""

    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        yield from items


class RichProgress:
    """A rich progress bar per loop (used by the CLI)."""

    def __init__(self, console=None):
        self.console = console

    def counter(self, description: str):
        """A context manager yielding ``advance(n)`` for loops that report counts (evaluate)."""
        from contextlib import contextmanager

        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        @contextmanager
        def _bar():
            columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"),
                       TextColumn("{task.completed} images"), TimeElapsedColumn())
            with Progress(*columns, console=self.console) as bar:
                task = bar.add_task(description, total=None)
                yield lambda n: bar.advance(task, n)

        return _bar()

    def track(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            try:
                for item in items:
                    yield item
                    bar.advance(task)
            except BaseException:  # the loop failed or was abandoned: the error line stands alone
                bar.live.transient = True
                raise
