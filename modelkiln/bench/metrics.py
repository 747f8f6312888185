"""Latency statistics over repeated runs: the value object every benchmark reports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Latency:
    """Seconds per run; `samples` are kept so that comparisons can test significance."""

    samples: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.samples), q))

    def summary(self) -> dict[str, Any]:
        return {
            "runs": len(self.samples),
            "mean_s": self.mean,
            "p50_s": self.p50,
            "p90_s": self.p90,
            "p99_s": self.p99,
            "stdev_s": self.stdev,
            "min_s": min(self.samples),
            "max_s": max(self.samples),
        }

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "samples": list(self.samples)}


def measure_latency(
    run: Callable[[], object],
    *,
    warmup: int = 5,
    runs: int | None = 50,
    duration_s: float | None = None,
    min_runs: int = 3,
) -> Latency:
    """Time `run` after `warmup` untimed calls: `runs` times, or for `duration_s` seconds.

    A time budget still takes at least `min_runs` samples, so that a comparison has a
    distribution to test even when one call outlasts the budget.
    """
    if (runs is None) == (duration_s is None):
        raise ValueError("give exactly one of runs and duration_s")
    if runs is not None and runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    for _ in range(warmup):
        run()
    samples: list[float] = []
    budget_started = time.perf_counter()
    while True:
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
        if runs is not None:
            if len(samples) >= runs:
                break
        elif len(samples) >= min_runs and time.perf_counter() - budget_started >= (duration_s or 0):
            break
    return Latency(tuple(samples))
