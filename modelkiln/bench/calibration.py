"""The host's speed when a report was measured: a fixed workload timed before and after the
entries, so that comparing two stored reports can say how much the host itself drifted
between them (a shared runner's neighbours, thermal state, another CPU governor) and, when
asked, normalise the timings by it."""

from __future__ import annotations

import datetime
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

WORKLOAD = "numpy float32 matmul 512x512 by 512x512, 8 per sample, median of 9 samples"


def time_workload() -> float:
    """Seconds of the fixed workload (the median of its samples)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512)).astype(np.float32)
    b = rng.standard_normal((512, 512)).astype(np.float32)
    a @ b  # BLAS threads and pages warmed up
    samples = []
    for _ in range(9):
        started = time.perf_counter()
        for _ in range(8):
            a @ b
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def calibration_record(before_s: float, after_s: float) -> dict[str, Any]:
    return {"workload": WORKLOAD, "before_s": before_s, "after_s": after_s}


@dataclass(frozen=True)
class Drift:
    """How the host's speed differed between two reports: current over baseline of the
    workload's time (1.4: the current host ran the same work 40 % slower)."""

    ratio: float
    hours_apart: float | None

    def describe(self) -> str:
        when = f", measured {self.hours_apart:.1f} h apart" if self.hours_apart is not None else ""
        if abs(self.ratio - 1) < 0.02:
            return f"the calibration workload ran at the same speed in both reports{when}"
        direction = "slower" if self.ratio > 1 else "faster"
        return (
            f"the calibration workload ran ×{self.ratio:.2f} ({direction}) in the current "
            f"report{when}: the host's own drift, not the builds'"
        )


def drift_between(baseline: dict[str, Any], current: dict[str, Any]) -> Drift | None:
    """None when either report predates the calibration record."""
    first, second = baseline.get("calibration"), current.get("calibration")
    if not first or not second:
        return None
    speed = statistics.fmean([first["before_s"], first["after_s"]])
    now = statistics.fmean([second["before_s"], second["after_s"]])
    return Drift(now / speed, _hours(baseline.get("created"), current.get("created")))


def _hours(first: str | None, second: str | None) -> float | None:
    try:
        start = datetime.datetime.fromisoformat(str(first))
        end = datetime.datetime.fromisoformat(str(second))
    except ValueError:
        return None
    return abs((end - start).total_seconds()) / 3600


def normalised(report: dict[str, Any], ratio: float) -> dict[str, Any]:
    """`report` with every timing divided by the host's drift (throughput multiplied)."""
    entries = []
    for entry in report["entries"]:
        latency = {
            key: (value / ratio if key.endswith("_s") else value)
            for key, value in entry["latency"].items()
        }
        latency["samples"] = [sample / ratio for sample in entry["latency"]["samples"]]
        entries.append(
            {**entry, "latency": latency, "throughput_per_s": entry["throughput_per_s"] * ratio}
        )
    return {**report, "entries": entries}
