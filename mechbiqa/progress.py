"""A rich progress bar for long runs, fed by the ``progress(done, total)`` callbacks the library takes.

The library reports progress through callbacks and never prints; a study's command line passes
`rate_bar`'s callback to show a bar on stderr (done / total, rate, elapsed, eta).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def rate_bar(label: str, unit: str = "img/s", show: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A bar on stderr while the block runs; yields ``update(done, total)``.

    Args:
        label: Bold text before the bar.
        unit: Unit of the rate (counted from the first update, so a resumed run's done rows don't count).
        show: False: no bar (the callback does nothing visible).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not show) as bar:
        task = bar.add_task(label, total=None, rate="")
        state: dict[str, float] = {}

        def update(done: int, total: int) -> None:
            now = time.perf_counter()
            if "t0" not in state:
                state.update(t0=now, d0=done)
            rate = (done - state["d0"]) / max(now - state["t0"], 1e-9)
            bar.update(
                task, total=total, completed=done, rate=f"{rate:.1f} {unit}" if done > state["d0"] else ""
            )

        yield update
