"""Progress bars for the long passes outside Lightning's loops: the integrity scan, the feature-cache pass,
predict and the audit. rich's bar on a terminal; nothing in logs and pipes, where each stage's log line gives
its seconds and img/s instead. TRANSFERLAB_PROGRESS=always|never overrides the terminal check."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: Optional[int], description: str, size: Optional[Callable[[Any], int]] = None) -> Iterator[T]:
    """Yield `items` unchanged while a bar counts them (`size(item)` units each: images of a batch; else 1)."""
    mode = os.environ.get("TRANSFERLAB_PROGRESS", "auto")
    if mode == "never":
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True, force_terminal=True if mode == "always" else None)
    if not console.is_terminal:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=mode != "always") as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task, size(item) if size else 1)
