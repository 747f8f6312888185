"""The interface every numpy scheduler implements: diffusers' SchedulerMixin, the part the
Stable Diffusion pipelines call, with numpy arrays in and out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import numpy as np

from modelkiln.errors import InputError


class NoiseSource(Protocol):
    """Where a stochastic step draws its noise (noise.TorchGenerator: torch.randn's values)."""

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """float32 standard normal samples of `shape`, as torch.randn(shape, generator=g)."""
        ...


class Scheduler(ABC):
    """A diffusers scheduler in numpy.

    Built from the artifact's scheduler_config.json (diffusers' keys; unknown keys are
    ignored as diffusers ignores them), it reproduces its diffusers class: the same
    `timesteps`, `sigmas` (where it has them) and, step by step, the same latents within
    1e-5 relative (tests/diffusion/test_schedulers.py drives both side by side).

    Use, as diffusers' pipelines do:
        scheduler.set_timesteps(steps)
        latents = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            latents = scheduler.step(unet(model_input, t), t, latents, generator)
    image-to-image starts part-way: set_begin_index(i) and add_noise(image_latents, noise,
    timesteps[i:i+1]).
    """

    # kiln's name for it (`kiln generate --scheduler NAME`) and the diffusers class it
    # reproduces (scheduler_config.json's "_class_name").
    name: ClassVar[str]
    diffusers_class: ClassVar[str]
    # The config keys and defaults of that diffusers class that this implementation reads.
    defaults: ClassVar[Mapping[str, Any]] = {}
    # Model evaluations per timestep entry (PNDM, Heun-like schedulers repeat timesteps).
    order: ClassVar[int] = 1

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config: dict[str, Any] = {
            **self.defaults,
            **{k: v for k, v in config.items() if k in self.defaults},
        }
        self.timesteps: np.ndarray = np.zeros(0)
        self.num_inference_steps: int | None = None
        self._begin_index: int | None = None
        self._step_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """The index of the next step's timestep (None until the first step)."""
        return self._step_index

    def _index_of(self, timestep: float) -> int:
        """Where `timestep` is in `timesteps`: the second match if it repeats, so that a run
        starting mid-schedule (image-to-image) skips no sigma, as diffusers does."""
        matches = np.flatnonzero(self.timesteps == timestep)
        if len(matches) == 0:
            raise InputError(f"timestep {timestep} is not in the scheduler's timesteps")
        return int(matches[1] if len(matches) > 1 else matches[0])

    def _index(self, timestep: float) -> int:
        """This step's index: the begin index, or found from the run's first timestep."""
        if self._step_index is None:
            begin = self._begin_index
            self._step_index = self._index_of(timestep) if begin is None else begin
        return self._step_index

    def _noise_indices(self, timesteps: np.ndarray) -> list[int]:
        """add_noise's index for each timestep: by value before a run has a begin index,
        else the run's own step (diffusers' add_noise)."""
        steps = np.atleast_1d(np.asarray(timesteps))
        if self._begin_index is None:
            return [self._index_of(t) for t in steps]
        start = self._step_index if self._step_index is not None else self._begin_index
        return [start] * len(steps)

    @property
    @abstractmethod
    def init_noise_sigma(self) -> float:
        """What the initial noise is multiplied by."""

    @abstractmethod
    def set_timesteps(self, num_inference_steps: int) -> None:
        """Compute `timesteps` (and sigmas) for a run of `num_inference_steps`."""

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at timesteps[begin_index] (image-to-image skips the first ones)."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """The UNet's input at `timestep` (identity unless the scheduler scales by sigma)."""
        return sample

    @abstractmethod
    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: NoiseSource | None = None,
    ) -> np.ndarray:
        """The previous (less noisy) sample: diffusers' step(...).prev_sample."""

    @abstractmethod
    def add_noise(
        self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray
    ) -> np.ndarray:
        """`original` noised to `timesteps` (one per batch item, or one for all)."""


__all__ = ["NoiseSource", "Scheduler"]
