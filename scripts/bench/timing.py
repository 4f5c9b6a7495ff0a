"""Timed repeats: interleaved across the compared sides, summarised as median and p10/p90."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np


def log(message: str) -> None:
    """Progress goes to stderr: stdout carries the markdown tables."""
    print(message, file=sys.stderr, flush=True)


def summary(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "n": len(ms)}


def wall_time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                timed: Callable[[Callable[[], object]], float] = wall_time) -> dict[str, dict]:
    """Time each function ``repeats`` times, alternating between them (a change in background
    load hits every side alike), after ``warmup`` calls each. ``timed(fn)`` gives one call's
    seconds (a GPU timing synchronises the device around it)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: summary(t) for name, t in times.items()}
