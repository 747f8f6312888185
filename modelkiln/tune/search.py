"""`kiln tune`: build every candidate under the quality budget, time the ones inside it
interleaved, each in a process of its own, and keep the fastest.

Each candidate is an ordinary build (the build cache makes a rerun cheap) whose end-to-end
gate is the budget, so "inside the budget" means exactly what it means for any build. The
candidates inside it are then timed with bench/interleaved.py, one `bench_call` per call
(a classifier's batch, or one whole generation), so the ranking does not follow the host's
load. Each candidate runs in a child process (bench/child_call.py): runtimes loaded side by
side slow each other down, and `kiln bench` times each alone. The result lists every
candidate with its status, quality, size and time; the winner is written as a profile file
that builds it again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path

from modelkiln.bench.child_call import bench_call_in_child
from modelkiln.bench.interleaved import time_interleaved
from modelkiln.bench.settings import BenchSettings
from modelkiln.errors import KilnError, ValidationError, first_line
from modelkiln.memory_budget import machine_memory_bytes
from modelkiln.plan import load_profile
from modelkiln.progress import NullProgress, Progress
from modelkiln.records import EndToEndRecord
from modelkiln.tune.budget import Budget
from modelkiln.tune.space import Candidate

logger = logging.getLogger(__name__)

INSIDE = "inside budget"
OUTSIDE = "outside budget"
FAILED = "failed"
# Candidates are timed side by side when their files take at most this share of memory
# (loaded, a model takes about its size again in working memory); otherwise one at a time.
SIDE_BY_SIDE_SHARE = 0.25


@dataclass(frozen=True)
class TuneSettings:
    budget: Budget
    data: str | None = None  # labelled images for classifiers ("digits", a folder)
    prompts: tuple[str, ...] = ()  # generators' prompts
    steps: int | None = None  # denoising steps of each generation (gate and timing)
    batch: int = 1  # images per timed call (classifiers, embeddings)
    threads: int | None = None
    rounds: int = 5
    block: int = 3
    overrides: tuple[str, ...] = ()  # the user's --set, for every candidate

    def common_overrides(self) -> list[str]:
        """What every candidate's build gets: the user's --set, the budget's gate, threads."""
        gate = self.budget.overrides(self.data, self.prompts, self.steps)
        threads = [] if self.threads is None else [f"runtime.threads={self.threads}"]
        return [*self.overrides, *gate, *threads]


@dataclass
class Tried:
    """One candidate: what its build said, and its time when it was inside the budget."""

    candidate: Candidate
    status: str
    reason: str | None = None
    artifact: Path | None = None
    quality: dict[str, float] = field(default_factory=dict)
    size_bytes: int | None = None
    latency_s: float | None = None
    spread_s: tuple[float, float] | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "label": self.candidate.label,
            "profile": self.candidate.base,
            "changes": list(self.candidate.changes),
            "status": self.status,
            "reason": self.reason,
            "artifact": None if self.artifact is None else str(self.artifact),
            # JSON has no infinity: an image identical to the reference's is null.
            "quality": {k: v if math.isfinite(v) else None for k, v in self.quality.items()},
            "size_bytes": self.size_bytes,
            "latency_s": self.latency_s,
            "latency_spread_s": None if self.spread_s is None else list(self.spread_s),
        }


def build_candidates(
    source: str | Path,
    candidates: Sequence[Candidate],
    settings: TuneSettings,
    work: Path,
    progress: Progress | None = None,
) -> list[Tried]:
    """Every candidate built under the budget into WORK/artifacts (cached in WORK/cache)."""
    from modelkiln.builder import build
    from modelkiln.loading import open_artifact

    progress = progress or NullProgress()
    tried = []
    for index, candidate in enumerate(candidates, 1):
        overrides = [*settings.common_overrides(), *candidate.changes]
        description = f"candidate {index}/{len(candidates)}: {candidate.label}"
        try:
            with progress.task(description):
                artifact = build(
                    source,
                    candidate.base,
                    work / "artifacts" / candidate.slug,
                    overrides=overrides,
                    cache=work / "cache",
                    reuse=True,
                    progress=progress,
                )
        except ValidationError as error:
            outside = str(error).startswith("end-to-end quality")
            status = OUTSIDE if outside else FAILED
            tried.append(Tried(candidate, status, first_line(error)))
            continue
        except KilnError as error:
            tried.append(Tried(candidate, FAILED, first_line(error)))
            continue
        manifest = open_artifact(artifact).manifest
        tried.append(
            Tried(
                candidate,
                INSIDE,
                artifact=artifact,
                quality=quality_of(manifest.end_to_end),
                size_bytes=manifest.size_bytes,
            )
        )
    return tried


def quality_of(record: EndToEndRecord | None) -> dict[str, float]:
    """The end-to-end numbers a budget bounds: the worst image, the top-1 drop."""
    if record is None:
        return {}
    found: dict[str, float] = {}
    if record.accuracy is not None:
        found["top1"] = record.accuracy
    if record.accuracy_drop is not None:
        found["top1_drop"] = record.accuracy_drop
    finite = [value for value in record.psnr_db if value is not None]
    if record.psnr_db:
        # None: an image identical to the reference's (infinite PSNR).
        found["min_psnr_db"] = min(finite) if finite else float("inf")
    if record.ssim:
        found["min_ssim"] = min(record.ssim)
    cosines = [score.min_cosine for score in record.outputs.values()]
    if cosines:
        found["min_cosine"] = min(cosines)
    return found


def time_candidates(
    tried: list[Tried], settings: TuneSettings, progress: Progress | None = None
) -> None:
    """Every candidate inside the budget timed interleaved; sets its latency."""
    inside = {t.candidate.label: t for t in tried if t.status == INSIDE}
    if not inside:
        return
    progress = progress or NullProgress()
    together = sum(t.size_bytes or 0 for t in inside.values())
    keep_open = together <= SIDE_BY_SIDE_SHARE * machine_memory_bytes()

    steps = settings.steps or BenchSettings().steps

    def opener(label: str) -> AbstractContextManager[Callable[[], object]]:
        artifact = inside[label].artifact
        assert artifact is not None  # set for every candidate inside the budget
        return bench_call_in_child(artifact, settings.batch, steps, settings.threads)

    description = f"timing {len(inside)} candidates, interleaved"
    with progress.task(description, total=settings.rounds) as advance:
        timings = time_interleaved(
            list(inside),
            opener,
            rounds=settings.rounds,
            block=settings.block,
            keep_open=keep_open,
            on_round=lambda index: advance(1) if index else None,  # the round before it
        )
        advance(1)
    for label, timing in timings.items():
        inside[label].latency_s = timing.median
        inside[label].spread_s = timing.spread


def fastest(tried: Sequence[Tried]) -> Tried | None:
    timed = [t for t in tried if t.latency_s is not None]
    return min(timed, key=lambda t: t.latency_s or 0.0) if timed else None


def winning_profile_toml(winner: Tried, settings: TuneSettings, machine: str) -> str:
    """The winner as a profile file: its base with the knobs, the budget's gate and the
    user's overrides, named and described after the search."""
    candidate = winner.candidate
    profile = load_profile(candidate.base, [*settings.common_overrides(), *candidate.changes])
    latency = f"{winner.latency_s * 1000:.1f} ms" if winner.latency_s is not None else "untimed"
    description = (
        f"kiln tune's fastest build inside {settings.budget.text}: {candidate.label}, "
        f"{latency} per call (batch {settings.batch}) on {machine}. {profile.description}"
    )
    named = replace(profile, name=f"{candidate.base}-tuned", description=description)
    return named.to_toml()


__all__ = [
    "FAILED",
    "INSIDE",
    "OUTSIDE",
    "Tried",
    "TuneSettings",
    "build_candidates",
    "fastest",
    "quality_of",
    "time_candidates",
    "winning_profile_toml",
]
