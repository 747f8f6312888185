"""Latency statistics over repeated runs: the value object every benchmark reports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
        return {**self.summary(), **asdict(self)}


def measure_latency(run: Callable[[], object], *, warmup: int = 5, runs: int = 50) -> Latency:
    """Time `run` `runs` times after `warmup` untimed calls."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return Latency(tuple(samples))
