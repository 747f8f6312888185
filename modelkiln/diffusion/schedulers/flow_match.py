"""Flow-matching Euler (SD3, Flux): diffusers' FlowMatchEulerDiscreteScheduler in numpy.

The model predicts the velocity noise - data; x_sigma = sigma * noise + (1 - sigma) * data,
and a step is x += (sigma_next - sigma) * velocity. Sigmas run from 1 to 1/1000, shifted
towards the noisy end by `shift` (SD3) or, with use_dynamic_shifting, by exp(mu) with the
pipeline's mu, which grows with the image's token count (Flux); timesteps are 1000 * sigma.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from modelkiln.diffusion.schedulers.base import NoiseSource, Scheduler
from modelkiln.diffusion.schedulers.common import (
    draw_noise,
    exponential_sigmas,
    karras_sigmas,
    require_choice,
)
from modelkiln.errors import InputError


class FlowMatchEulerDiscrete(Scheduler):
    """diffusers' FlowMatchEulerDiscreteScheduler: static or dynamic (mu) shifting,
    shift_terminal, invert_sigmas, Karras or exponential sigmas, stochastic sampling."""

    name = "flow-match-euler"
    diffusers_class = "FlowMatchEulerDiscreteScheduler"
    defaults: ClassVar[Mapping[str, Any]] = {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        # The pipeline computes mu from these and the image's sequence length.
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        owner = self.diffusers_class
        require_choice(owner, self.config, "time_shift_type", ("exponential", "linear"))
        # Beta sigmas need scipy's beta quantiles, which the runtime does not carry.
        require_choice(owner, self.config, "use_beta_sigmas", (False,))
        count = int(self.config["num_train_timesteps"])
        # The training sigmas in float32, as diffusers' __init__ makes them; only their
        # ends matter: every schedule spans sigma_max..sigma_min.
        sigmas = np.linspace(1, count, count, dtype=np.float32)[::-1] / np.float32(count)
        if not self.config["use_dynamic_shifting"]:
            sigmas = self._shifted(sigmas)
        self.sigma_min, self.sigma_max = float(sigmas[-1]), float(sigmas[0])
        self.sigmas = np.zeros(0, dtype=np.float32)

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def _shifted(self, sigmas: np.ndarray) -> np.ndarray:
        """The static shift s * sigma / (1 + (s - 1) * sigma), in the dtype of `sigmas`."""
        shift = float(self.config["shift"])
        return np.asarray(shift * sigmas / (1 + (shift - 1) * sigmas))

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        mu: float | None = None,
        sigmas: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """The schedule of `num_inference_steps`; `mu` (the pipeline's, from the image's
        token count) is required with use_dynamic_shifting, as in diffusers. `sigmas`: the
        unshifted sigmas to start from (Flux's pipelines pass 1 .. 1/steps), in float32 as
        diffusers takes them; default: sigma_max .. sigma_min in float64."""
        config, steps = self.config, int(num_inference_steps)
        if config["use_dynamic_shifting"] and mu is None:
            raise InputError(f"{self.diffusers_class}: use_dynamic_shifting needs mu")
        count = int(config["num_train_timesteps"])
        schedule: np.ndarray
        if sigmas is not None:
            schedule = np.asarray(sigmas, dtype=np.float32)
            if schedule.shape != (steps,):
                raise InputError(
                    f"{self.diffusers_class}: got {schedule.size} sigmas for {steps} steps"
                )
        else:
            # float64 from here to the float32 cast, as diffusers' numpy code is.
            timesteps = np.linspace(self.sigma_max * count, self.sigma_min * count, steps)
            schedule = timesteps / count
        if config["use_dynamic_shifting"]:
            assert mu is not None
            schedule = self._time_shift(float(mu), schedule)
        else:
            # Applied again on top of the shifted sigma_min/sigma_max, as diffusers does.
            schedule = self._shifted(schedule)
        if config["shift_terminal"]:
            if steps < 2:  # diffusers divides by 1 - sigma_max = 0 and its step fails
                raise InputError(f"{self.diffusers_class}: shift_terminal needs 2 or more steps")
            one_minus = 1 - schedule
            scale = one_minus[-1] / (1 - config["shift_terminal"])
            schedule = 1 - (one_minus / scale)
        if config["use_karras_sigmas"]:
            schedule = karras_sigmas(float(schedule[-1]), float(schedule[0]), steps)
        elif config["use_exponential_sigmas"]:
            schedule = exponential_sigmas(float(schedule[-1]), float(schedule[0]), steps)
        sigmas32 = schedule.astype(np.float32)
        final = np.float32(0.0)
        if config["invert_sigmas"]:  # Mochi: inverted sigmas, timesteps of the inverted ones
            sigmas32, final = np.float32(1.0) - sigmas32, np.float32(1.0)
        self.timesteps = sigmas32 * np.float32(count)
        self.sigmas = np.append(sigmas32, final).astype(np.float32)
        self.num_inference_steps = steps
        self._step_index = None
        self._begin_index = None

    def _time_shift(self, mu: float, sigmas: np.ndarray) -> np.ndarray:
        """Resolution-dependent shifting by exp(mu) (exponential) or mu (linear)."""
        if self.config["time_shift_type"] == "exponential":
            return np.asarray(math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0))
        return np.asarray(mu / (mu + (1 / sigmas - 1) ** 1.0))

    def scale_noise(
        self, sample: np.ndarray, timestep: np.ndarray, noise: np.ndarray
    ) -> np.ndarray:
        """diffusers' scale_noise, the forward process: sigma * noise + (1 - sigma) * sample
        at each timestep's sigma (one per batch item, or one for all)."""
        timesteps = np.atleast_1d(np.asarray(timestep))
        sigma = self.sigmas.astype(sample.dtype)[self._noise_indices(timesteps)]
        sigma = sigma.reshape(sigma.shape + (1,) * (sample.ndim - 1))
        return np.asarray(sigma * noise + (1.0 - sigma) * sample)

    def add_noise(
        self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray
    ) -> np.ndarray:
        """Image-to-image noising for flow matching: scale_noise(original, timesteps, noise)."""
        return self.scale_noise(original, timesteps, noise)

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: NoiseSource | None = None,
    ) -> np.ndarray:
        if self.num_inference_steps is None:
            raise InputError(f"{self.diffusers_class}: call set_timesteps before step")
        index = self._index(timestep)
        sample = sample.astype(np.float32)
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        if self.config["stochastic_sampling"]:
            x0 = sample - sigma * model_output
            noise = draw_noise(generator, sample.shape)
            prev = (np.float32(1.0) - sigma_next) * x0 + sigma_next * noise
        else:
            prev = sample + (sigma_next - sigma) * model_output
        self._step_index = index + 1
        return np.asarray(prev).astype(model_output.dtype)


__all__ = ["FlowMatchEulerDiscrete"]
