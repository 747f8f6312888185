"""Several calls timed in one process, interleaved: round after round, a short block of each.

Timed one after the other, configurations see different moments of a shared host's load (its
speed drifts by up to 2x within minutes here), and whichever runs last is always last. Timed
in rounds of short blocks, every configuration sees the same drift, and reversing the order
every other round keeps any one from always following the same neighbour (a cache or a
thermal state it left behind). A configuration's time is the median of its block medians: a
preempted call is an outlier of one block, not of the result. `kiln tune` ranks candidates
this way; `kiln compare --rerun` is the two-sided case with its own gate (paired.py).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass

from modelkiln.errors import InputError


@dataclass(frozen=True)
class InterleavedTiming:
    """Every round's block median of one configuration, in seconds."""

    label: str
    rounds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def spread(self) -> tuple[float, float]:
        """The fastest and the slowest round."""
        return min(self.rounds), max(self.rounds)


# Opens one configuration: a context whose value is the call to time.
Opener = Callable[[str], AbstractContextManager[Callable[[], object]]]


def time_interleaved(
    labels: Sequence[str],
    opener: Opener,
    *,
    rounds: int = 5,
    block: int = 3,
    warmup: int = 1,
    keep_open: bool = True,
    on_round: Callable[[int], None] = lambda index: None,
) -> dict[str, InterleavedTiming]:
    """`rounds` rounds of `block` timed calls of each configuration, in the given order on
    even rounds and reversed on odd ones; `on_round(i)` runs before round i.

    `keep_open`: every configuration is opened (and warmed up) once, before the first round.
    Otherwise each block opens its configuration, warms it up and closes it after (models
    that do not fit in memory together); opening and warm-up are never timed."""
    if not labels:
        raise InputError("nothing to time: give at least one configuration")
    if rounds < 1 or block < 1 or warmup < 0:
        raise InputError(
            f"rounds and block must be >= 1 and warmup >= 0; got {rounds}, {block}, {warmup}"
        )
    medians: dict[str, list[float]] = {label: [] for label in labels}
    with ExitStack() as held:
        opened: dict[str, Callable[[], object]] = {}
        if keep_open:
            for label in labels:
                opened[label] = held.enter_context(opener(label))
                _warm(opened[label], warmup)
        for index in range(rounds):
            on_round(index)
            for label in labels if index % 2 == 0 else list(reversed(labels)):
                if keep_open:
                    medians[label].append(_block(opened[label], block))
                    continue
                with opener(label) as call:
                    _warm(call, warmup)
                    medians[label].append(_block(call, block))
    return {label: InterleavedTiming(label, tuple(medians[label])) for label in labels}


def _warm(call: Callable[[], object], times: int) -> None:
    for _ in range(times):
        call()


def _block(call: Callable[[], object], size: int) -> float:
    samples = []
    for _ in range(size):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


__all__ = ["InterleavedTiming", "Opener", "time_interleaved"]
