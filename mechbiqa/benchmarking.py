"""What the ``studies/bench_*.py`` scripts share: timing two methods fairly on a shared machine."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def interleaved_best(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[float, Any, float, Any]:
    """Best wall time of each of two functions, run alternately (a shared machine's load hits both alike).

    Returns:
        ``(seconds_a, last_output_a, seconds_b, last_output_b)``.
    """
    best_a = best_b = float("inf")
    out_a = out_b = None
    for _ in range(repeats):
        start = time.perf_counter()
        out_a = a()
        best_a = min(best_a, time.perf_counter() - start)
        start = time.perf_counter()
        out_b = b()
        best_b = min(best_b, time.perf_counter() - start)
    return best_a, out_a, best_b, out_b
