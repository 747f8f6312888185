"""TaylorSeer Lite (OpenVINO GenAI's TaylorSeerCacheConfig; Liu et al., 2025, "From Reusing
to Forecasting"), in numpy, over any denoiser.

The denoiser's output moves smoothly from step to step, so on most steps it can be forecast
instead of computed: after `warmup` computed steps, one step in `interval` runs the denoiser
and the steps between take the last computed output plus its first derivative (the change
between the last two computed outputs, per step) times the steps since. The last `cooldown`
steps compute again, where the image's detail is decided. Which steps compute follows
GenAI's TaylorSeerState (its taylorseer_lite.hpp), so the settings mean what they mean
there. GenAI's Lite stops at the first derivative; `order` goes further as diffusers'
TaylorSeerCacheConfig(max_order) does: each computed step's derivatives are the divided
differences of the last one's, and the forecast is their Taylor series. What is kept is the
output and its derivatives alone (order + 1 arrays per call), so this works the same on a
UNet, SD3's or Flux's transformer, with ControlNets, and on every backend, without a
rebuild.
"""

from __future__ import annotations

import math
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
    order: int = 1  # the highest derivative the forecast uses

    def computes(self, index: int) -> bool:
        warmup = max(self.warmup, MIN_WARMUP)
        if index < warmup or index >= self.steps - self.cooldown:
            return True
        return (index - warmup + 1) % self.interval == 0


@dataclass
class _Kept:
    # The last computed output, then its derivatives per step (divided differences with the
    # computed steps before it), as many as the order and the computed steps allow.
    factors: list[np.ndarray]
    step: int  # the step it was computed on

    def forecast(self, step: int) -> np.ndarray:
        """The Taylor series about the kept step, at `step`."""
        offset = np.float32(step - self.step)
        forecast = self.factors[0].copy()
        for order, factor in enumerate(self.factors[1:], start=1):
            forecast += factor * np.float32(offset**order / math.factorial(order))
        return forecast

    def updated(self, output: np.ndarray, step: int, order: int) -> _Kept:
        """What is kept after `output` was computed on `step`."""
        factors = [output]
        for previous in self.factors[:order]:
            factors.append((factors[-1] - previous) / np.float32(step - self.step))
        return _Kept(factors, step)


class TaylorSeerDenoiser:
    """`denoiser` on the steps `schedule` computes; a forecast of its output on the others,
    to the schedule's order. A step whose batch changed (guidance ended) starts again: what was
    kept belongs to the other batch. Kept per call within a step, so split guidance's two
    calls each forecast their own."""

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
            and len(kept.factors) > 1
            and len(kept.factors[0]) == len(sample)
            and not self.schedule.computes(self._step)
        ):
            return kept.forecast(self._step)
        output = np.asarray(self.denoiser(sample, timestep, conditioning), dtype=np.float32)
        if kept is None or len(kept.factors[0]) != len(output):
            self._kept[call] = _Kept([output], self._step)
        else:
            self._kept[call] = kept.updated(output, self._step, self.schedule.order)
        return output


__all__ = ["MIN_WARMUP", "ForecastSchedule", "TaylorSeerDenoiser"]
