"""`kiln tune SOURCE`: the fastest build of SOURCE inside a quality budget, on this machine.

resolve SOURCE, find its family ─► space.py: the candidates (bundled profiles that run
here on the chosen runtimes, and their one-knob variants)
─► search.py: build each with the budget as its end-to-end gate; time those inside it,
interleaved ─► WORK/tune.json, WORK/tune.md, and the winner as a profile file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkiln.env import cpu_info
from modelkiln.outputs import write_file_atomic
from modelkiln.progress import NullProgress, Progress
from modelkiln.tune.search import (
    INSIDE,
    Tried,
    TuneSettings,
    build_candidates,
    fastest,
    time_candidates,
    winning_profile_toml,
)
from modelkiln.tune.space import candidate_space

RESULT_JSON = "tune.json"
RESULT_MARKDOWN = "tune.md"
WINNER_PROFILE = "tuned.toml"


@dataclass
class TuneResult:
    source: str
    family: str
    machine: str
    settings: TuneSettings
    tried: list[Tried]
    winner: Tried | None
    profile_file: Path | None

    @property
    def best_bundled(self) -> Tried | None:
        """The fastest unmodified bundled profile inside the budget: what the winner beats."""
        return fastest([t for t in self.tried if not t.candidate.changes])

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "family": self.family,
            "machine": self.machine,
            "budget": self.settings.budget.text,
            "batch": self.settings.batch,
            "steps": self.settings.steps,
            "threads": self.settings.threads,
            "winner": None if self.winner is None else self.winner.candidate.label,
            "profile_file": None if self.profile_file is None else str(self.profile_file),
            "candidates": [t.to_json() for t in self.tried],
        }

    def ranked(self) -> list[Tried]:
        """Timed candidates fastest first, then the rest as they were tried."""
        return sorted(self.tried, key=_order)

    def to_markdown(self) -> str:
        lines = [
            f"`kiln tune {self.source}`: {self.family} model, budget {self.settings.budget.text}, "
            f"batch {self.settings.batch}, on {self.machine}.",
            "",
            "| candidate | status | quality | size | latency | vs best bundled |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        reference = self.best_bundled
        for tried in self.ranked():
            mark = " **(winner)**" if tried is self.winner else ""
            lines.append(
                f"| {tried.candidate.label}{mark} | {tried.status} | {outcome_text(tried)} | "
                f"{size_text(tried)} | {_latency(tried)} | {_ratio(reference, tried)} |"
            )
        return "\n".join(lines) + "\n"


def tune(
    source: str | Path,
    settings: TuneSettings,
    work: str | Path,
    *,
    runtimes: Sequence[str] | None = None,
    profiles: Sequence[str] = (),
    wide: bool = True,
    profile_out: str | Path | None = None,
    progress: Progress | None = None,
) -> TuneResult:
    """Search, build, time; WORK holds the artifacts, the cache and the result files."""
    from modelkiln.models import detect_family
    from modelkiln.sources import resolve_source

    progress = progress or NullProgress()
    work = Path(work)
    with progress.task(f"resolving {source}"):
        family = detect_family(resolve_source(source)).name
    cpu = cpu_info()
    candidates = candidate_space(
        family,
        runtimes,
        bases=profiles,
        wide=wide,
        cpu_features=cpu["features"],
        overrides=settings.common_overrides(),
    )
    tried = build_candidates(source, candidates, settings, work, progress)
    time_candidates(tried, settings, progress)
    winner = fastest(tried)
    machine = f"{cpu['model']} ({', '.join(cpu['features'])})"
    profile_file = None
    if winner is not None:
        profile_file = Path(profile_out) if profile_out is not None else work / WINNER_PROFILE
        toml = winning_profile_toml(winner, settings, cpu["model"])
        write_file_atomic(profile_file, toml.encode())
    result = TuneResult(str(source), family, machine, settings, tried, winner, profile_file)
    write_file_atomic(work / RESULT_JSON, (json.dumps(result.to_json(), indent=2) + "\n").encode())
    write_file_atomic(work / RESULT_MARKDOWN, result.to_markdown().encode())
    return result


def _order(tried: Tried) -> tuple[int, float]:
    return (0, tried.latency_s) if tried.latency_s is not None else (1, math.inf)


def quality_text(tried: Tried) -> str:
    """What the gate measured, as a reader says it (top-1, drop, PSNR, SSIM, cosine)."""
    names = {
        "top1": "top-1 {:.2%}",
        "top1_drop": "drop {:+.2f} pt",
        "min_psnr_db": "PSNR ≥ {:.1f} dB",
        "min_ssim": "SSIM ≥ {:.3f}",
        "min_cosine": "cosine ≥ {:.4f}",
    }
    return ", ".join(names[key].format(value) for key, value in tried.quality.items())


def outcome_text(tried: Tried) -> str:
    """What its gate measured when it was inside the budget, else why it was not."""
    return quality_text(tried) if tried.status == INSIDE else tried.reason or ""


def size_text(tried: Tried) -> str:
    return "" if tried.size_bytes is None else f"{tried.size_bytes / 1e6:.1f} MB"


def _latency(tried: Tried) -> str:
    if tried.latency_s is None or tried.spread_s is None:
        return ""
    low, high = tried.spread_s
    return f"{tried.latency_s * 1000:.1f} ms ({low * 1000:.1f}–{high * 1000:.1f})"


def _ratio(reference: Tried | None, tried: Tried) -> str:
    if reference is None or reference.latency_s is None or tried.latency_s is None:
        return ""
    return f"{reference.latency_s / tried.latency_s:.2f}×"


__all__ = [
    "RESULT_JSON",
    "RESULT_MARKDOWN",
    "WINNER_PROFILE",
    "TuneResult",
    "outcome_text",
    "quality_text",
    "size_text",
    "tune",
]
