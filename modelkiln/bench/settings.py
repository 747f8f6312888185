"""How `kiln bench` measures: one settings object for the orchestrator, the isolated child
processes and the measuring code alike (it travels to a child as JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from modelkiln.errors import InputError
from modelkiln.profiles import MAX_BATCH, MAX_STEPS

MAX_RUNS = 1_000_000
MAX_DURATION_S = 86_400.0  # a day per batch size


@dataclass(frozen=True)
class BenchSettings:
    """How to measure. None means "as each artifact's profile says" (threads, runtime)."""

    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 3
    runs: int | None = 20
    duration_s: float | None = None  # a time budget per batch size instead of `runs`
    threads: int | None = None
    # Own process per artifact: peak memory and thread pools are that artifact's alone.
    isolate: bool = True
    runtime: str | None = None
    data: str | None = None  # image models: labelled folder (ImageFolder) or "digits"
    prompts: tuple[str, ...] = ()  # diffusion: PSNR / SSIM against torch fp32
    steps: int = 4  # denoising steps per generated image
    reference: str | None = None  # where the torch reference loads from (default: the source)
    use_reference: bool = True

    def __post_init__(self) -> None:
        # TOML and JSON give lists: keep the frozen dataclass hashable and comparable.
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.batch_sizes or any(not 1 <= b <= MAX_BATCH for b in self.batch_sizes):
            raise InputError(f"batch sizes must be in 1..{MAX_BATCH}, got {list(self.batch_sizes)}")
        if not 0 <= self.warmup <= MAX_RUNS:
            raise InputError(f"warmup must be in 0..{MAX_RUNS}, got {self.warmup}")
        if self.duration_s is not None:
            # NaN fails this too: a budget that never runs out would never end.
            if not 0 < self.duration_s <= MAX_DURATION_S:
                raise InputError(
                    f"--duration must be in (0, {MAX_DURATION_S:g}] seconds, got {self.duration_s}"
                )
            object.__setattr__(self, "runs", None)  # a budget replaces the run count
        elif self.runs is None or not 1 <= self.runs <= MAX_RUNS:
            raise InputError(f"runs must be in 1..{MAX_RUNS}, got {self.runs}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise InputError(f"steps must be in 1..{MAX_STEPS}, got {self.steps}")
        if self.data is not None:
            from modelkiln.datasets import DIGITS, image_set

            # A folder fails now, not after minutes of timing. The digits set cannot fail, and
            # loading it here would load it once more in every isolated child (which rebuilds
            # these settings from JSON) on top of the load that measures accuracy.
            if self.data != DIGITS:
                image_set(self.data, "--data", "test")

    def to_json(self) -> str:
        """What an isolated child or a cluster task rebuilds these settings from."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchSettings:
        return cls(**json.loads(text))

    def report_settings(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            "warmup": self.warmup,
            "runs": self.runs,
            "duration_s": self.duration_s,
            "threads": self.threads,
            "isolate": self.isolate,
            "runtime": self.runtime,
            "data": self.data,
            "prompts": list(self.prompts) or None,
            "steps": self.steps,
            "reference": self.reference if self.use_reference else "none",
        }
