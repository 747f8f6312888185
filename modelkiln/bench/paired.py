"""Paired measurement: a baseline and a candidate timed alternating in short blocks, each in a
child process of its own (child_call.py: runtimes in one process slow each other down), and
gated on the ratio of their latencies (`kiln compare --rerun`).

Two reports measured at different times compare the host's speed at those times as much as
the builds: on a shared runner the same artifact measured twice differs by +40..100 %. Timed
in alternating blocks, both sides see the same load, and the ratio of each round's block
medians cancels it. The gate reads the median of those ratios with a bootstrap confidence
interval over rounds: a regression is a ratio beyond the bound whose interval lies above 1
(significant and large enough); rounds alternate which side goes first. Medians, not means:
a call the scheduler preempts is an outlier of one side, and under a CPU burner on this
2-core host the geometric mean of the ratios put 7 of 30 A/A runs beyond the bound with an
interval excluding 1, the median none (block 3, 24 rounds).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelkiln.bench.comparison import Bounds, Comparison, Machine, Metric, Row, Status
from modelkiln.bench.settings import BenchSettings
from modelkiln.errors import InputError
from modelkiln.progress import NullProgress, Progress

PAIRED_LATENCY = Metric("latency (paired)", "s", higher_is_better=False, relative=True)
MAX_ROUNDS = 10_000
RESAMPLES = 4000


@dataclass(frozen=True)
class PairedSettings:
    """How the pair is timed: `rounds` rounds, each a block of `block` calls per side."""

    rounds: int = 20
    block: int = 3

    def __post_init__(self) -> None:
        if not 3 <= self.rounds <= MAX_ROUNDS:
            raise InputError(f"rounds must be in 3..{MAX_ROUNDS}, got {self.rounds}")
        if not 1 <= self.block <= MAX_ROUNDS:
            raise InputError(f"block must be in 1..{MAX_ROUNDS}, got {self.block}")


@dataclass(frozen=True)
class PairedTiming:
    """Each round's block median of both sides, in seconds."""

    label: str
    baseline: tuple[float, ...]
    candidate: tuple[float, ...]

    @property
    def log_ratios(self) -> np.ndarray:
        return np.log(np.asarray(self.candidate) / np.asarray(self.baseline))

    @property
    def ratio(self) -> float:
        """Candidate over baseline: the median of the rounds' ratios."""
        return float(np.exp(np.median(self.log_ratios)))

    def bootstrap(self, alpha: float, seed: int = 0) -> tuple[float, float, float]:
        """(low, high, p): the ratio's two-sided 1 - 2 alpha interval over resampled rounds,
        and the one-sided p that the candidate is no slower (share of resamples <= 1)."""
        logs = self.log_ratios
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, len(logs), size=(RESAMPLES, len(logs)))
        medians = np.median(logs[picks], axis=1)
        low, high = np.quantile(medians, [alpha, 1 - alpha])
        p_slower = float((medians <= 0).mean())
        return float(np.exp(low)), float(np.exp(high)), p_slower


def time_pair(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    settings: PairedSettings,
    *,
    warmup: int = 3,
    label: str = "",
    on_round: Callable[[int], None] = lambda index: None,
) -> PairedTiming:
    """Both calls warmed up, then `rounds` rounds of a block of each (the first side
    alternating); `on_round(i)` runs before round i (progress; a test's injected load)."""
    calls = (baseline, candidate)
    for _ in range(warmup):
        for call in calls:
            call()
    medians: tuple[list[float], list[float]] = ([], [])
    for index in range(settings.rounds):
        on_round(index)
        for side in (0, 1) if index % 2 == 0 else (1, 0):
            samples = []
            for _ in range(settings.block):
                started = time.perf_counter()
                calls[side]()
                samples.append(time.perf_counter() - started)
            medians[side].append(statistics.median(samples))
    return PairedTiming(label, tuple(medians[0]), tuple(medians[1]))


def gate_row(timing: PairedTiming, bounds: Bounds) -> Row:
    """The paired verdict: regressed when the ratio is beyond the bound and its interval
    lies above 1; improved the other way round; noise when beyond but not significant."""
    low, high, p_slower = timing.bootstrap(bounds.alpha)
    ratio, bound = timing.ratio, bounds.max_latency_regression
    if ratio > 1 + bound:
        status = Status.REGRESSED if low > 1 else Status.NOISE
    elif ratio < 1 / (1 + bound):
        status = Status.IMPROVED if high < 1 else Status.NOISE
    else:
        status = Status.OK
    confidence = round(100 * (1 - 2 * bounds.alpha))
    note = (
        f"paired ×{ratio:.3f} [{low:.3f}, {high:.3f}] ({confidence} % CI, "
        f"{len(timing.baseline)} rounds)"
    )
    return Row(
        timing.label,
        PAIRED_LATENCY,
        status,
        statistics.median(timing.baseline),
        statistics.median(timing.candidate),
        ratio - 1,
        bound,
        p_slower if ratio >= 1 else 1 - p_slower,
        note,
        label=timing.label,
    )


def compare_rerun(
    baseline: Path,
    candidate: Path,
    bench: BenchSettings,
    paired: PairedSettings,
    bounds: Bounds,
    progress: Progress | None = None,
) -> Comparison:
    """Load both artifacts (or bundles), each in a child process, and time them paired at
    each batch size."""
    from modelkiln.bench.child_call import bench_call_in_child
    from modelkiln.env import machine_report
    from modelkiln.loading import open_artifact

    progress = progress or NullProgress()
    names = [
        f"{Path(p).name} · {open_artifact(p).manifest.profile.name}" for p in (baseline, candidate)
    ]
    timings: list[PairedTiming] = []
    for batch in bench.batch_sizes:
        label = f"{names[1]} vs {names[0]} · b{batch}"
        with (
            bench_call_in_child(
                baseline, batch, bench.steps, bench.threads, bench.runtime
            ) as base_call,
            bench_call_in_child(
                candidate, batch, bench.steps, bench.threads, bench.runtime
            ) as candidate_call,
            progress.task(f"paired: {label}", total=paired.rounds) as advance,
        ):

            def next_round(_index: int, step: Callable[..., None] = advance) -> None:
                step()

            timings.append(
                time_pair(
                    base_call,
                    candidate_call,
                    paired,
                    warmup=bench.warmup,
                    label=label,
                    on_round=next_round,
                )
            )
    machine = Machine.from_report({"machine": machine_report()})
    rows = tuple(gate_row(timing, bounds) for timing in timings)
    return Comparison(machine, machine, bounds, rows)
