"""TaylorSeer Lite (OpenVINO GenAI's TaylorSeerCacheConfig; Liu et al., 2025, "From Reusing
to Forecasting"), in numpy, over any denoiser.

The denoiser's output moves smoothly from step to step, so on most steps it can be forecast
instead of computed: after `warmup` computed steps, one step in `interval` runs the denoiser
and the steps between take the last computed output plus its first derivative (the change
between the last two computed outputs, per step) times the steps since. The last `cooldown`
steps compute again, where the image's detail is decided. Which steps compute follows
GenAI's TaylorSeerState (its taylorseer_lite.hpp), so the settings mean what they mean
there. What is kept is the output alone (two arrays per call), so this works the same on a
UNet, SD3's or Flux's transformer, with ControlNets, and on every backend, without a
rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelkiln.diffusion.denoise import Conditioning, Denoiser, StepCalls

# Steps computed before any forecast, whatever the warm-up asked: a derivative needs two.
MIN_WARMUP = 2


@dataclass(frozen=True)
class ForecastSchedule:
    """Which steps of a run of `steps` compute, as OpenVINO GenAI's TaylorSeerState decides:
    the first `warmup` (at least the two a derivative needs), the last `cooldown`, and
    between them the last step of each `interval` counted from the warm-up's last step; the
    others are forecast."""

    interval: int
    warmup: int
    cooldown: int
    steps: int

    def computes(self, index: int) -> bool:
        warmup = max(self.warmup, MIN_WARMUP)
        if index < warmup or index >= self.steps - self.cooldown:
            return True
        return (index - warmup + 1) % self.interval == 0


@dataclass
class _Kept:
    output: np.ndarray  # the last computed output
    step: int  # its step
    derivative: np.ndarray | None = None  # per step, from the computed step before it


class TaylorSeerDenoiser:
    """`denoiser` on the steps `schedule` computes; a first-order forecast of its output on
    the others. A step whose batch changed (guidance ended) starts again: what was kept
    belongs to the other batch. Kept per call within a step, so split guidance's two calls
    each forecast their own."""

    def __init__(self, denoiser: Denoiser, schedule: ForecastSchedule) -> None:
        self.denoiser = denoiser
        self.schedule = schedule
        self._kept: dict[int, _Kept] = {}
        self._calls = StepCalls()
        self._step = 0

    def start_step(self, index: int, guided: bool) -> None:
        if self._calls.start(guided):
            self._kept.clear()
        self._step = index

    def __call__(
        self, sample: np.ndarray, timestep: float, conditioning: Conditioning
    ) -> np.ndarray:
        call = self._calls.next()
        kept = self._kept.get(call)
        if (
            kept is not None
            and kept.derivative is not None
            and len(kept.output) == len(sample)
            and not self.schedule.computes(self._step)
        ):
            return kept.output + kept.derivative * np.float32(self._step - kept.step)
        output = np.asarray(self.denoiser(sample, timestep, conditioning), dtype=np.float32)
        derivative = None
        if kept is not None and len(kept.output) == len(output):
            derivative = (output - kept.output) / np.float32(self._step - kept.step)
        self._kept[call] = _Kept(output, self._step, derivative)
        return output


__all__ = ["MIN_WARMUP", "ForecastSchedule", "TaylorSeerDenoiser"]
