"""Euler samplers (Karras et al.'s Algorithm 2 without churn, and its ancestral variant) as
diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler run them, in numpy.

`SigmaScheduler` holds what these and LMS share: a float32 `sigmas` table walked by a step
counter, model inputs scaled by 1/sqrt(sigma^2 + 1), noise added as x + sigma * noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from modelkiln.diffusion.schedulers.base import NoiseSource, Scheduler
from modelkiln.diffusion.schedulers.common import (
    BETA_DEFAULTS,
    TIMESTEP_SPACINGS,
    alphas_cumprod,
    draw_noise,
    exponential_sigmas,
    karras_sigmas,
    require_choice,
    sigma_to_t,
    spaced_timesteps,
    torch_linspace,
    train_betas,
    train_sigmas,
)
from modelkiln.errors import UnsupportedError


class SigmaScheduler(Scheduler):
    """The sigma-table schedulers' common part (diffusers' Euler, Euler ancestral, LMS)."""

    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self._check_config()
        self.alphas_cumprod = alphas_cumprod(train_betas(self.config))
        if self.config.get("rescale_betas_zero_snr"):
            # diffusers' way of keeping the last sigma finite under a zero terminal SNR
            self.alphas_cumprod[-1] = np.float32(2.0**-24)
        count = int(self.config["num_train_timesteps"])
        self.sigmas = np.append(train_sigmas(self.alphas_cumprod)[::-1], 0).astype(np.float32)
        self.timesteps = np.arange(count - 1, -1, -1, dtype=np.float32)

    def _check_config(self) -> None:
        require_choice(self.name, self.config, "timestep_spacing", TIMESTEP_SPACINGS)
        require_choice(self.name, self.config, "prediction_type", self.prediction_types)

    @property
    def init_noise_sigma(self) -> float:
        peak = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(peak)
        return float(np.sqrt(peak * peak + np.float32(1)))

    def _reset(self, num_inference_steps: int, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        self.num_inference_steps = num_inference_steps
        self.timesteps = timesteps.astype(np.float32)
        self.sigmas = sigmas.astype(np.float32)
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        sigma = self.sigmas[self._index(timestep)]
        return (sample / np.sqrt(sigma * sigma + np.float32(1))).astype(sample.dtype)

    def _denoised(self, model_output: np.ndarray, sample: np.ndarray, sigma: Any) -> np.ndarray:
        """The predicted clean sample (diffusers' pred_original_sample) at noise level sigma."""
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            return sample - sigma * model_output
        if kind == "v_prediction":
            return model_output * (-sigma / np.sqrt(sigma * sigma + np.float32(1))) + (
                sample / (sigma * sigma + np.float32(1))
            )
        return model_output

    def add_noise(
        self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray
    ) -> np.ndarray:
        sigma = self.sigmas[self._noise_indices(timesteps)].astype(original.dtype)
        sigma = sigma.reshape(sigma.shape + (1,) * (original.ndim - 1))
        return original + noise * sigma

    def _train_sigma_schedule(self, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(timesteps float32, their sigmas interpolated from the training table, log table)."""
        timesteps = spaced_timesteps(self.config, steps).astype(np.float32)
        table = train_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
        return timesteps, sigmas, np.log(table)


def _exp32(values: np.ndarray) -> np.ndarray:
    """torch's float32 exp, nearly: float64's rounded (numpy's float32 exp is coarser)."""
    return np.exp(values.astype(np.float64)).astype(np.float32)


def _log32(values: np.ndarray) -> np.ndarray:
    """torch's float32 log, nearly: float64's rounded (numpy's float32 log is coarser)."""
    return np.log(values.astype(np.float64)).astype(np.float32)


def check_sigma_options(scheduler: SigmaScheduler) -> None:
    """Karras and exponential sigmas are reproduced; beta sigmas need scipy's beta.ppf."""
    require_choice(scheduler.name, scheduler.config, "use_beta_sigmas", (False,))
    if scheduler.config["use_karras_sigmas"] and scheduler.config["use_exponential_sigmas"]:
        raise UnsupportedError(
            f"{scheduler.name}: use_karras_sigmas and use_exponential_sigmas are both set; "
            "supported: at most one of them"
        )


class EulerDiscrete(SigmaScheduler):
    """diffusers' EulerDiscreteScheduler (s_churn = 0, as its pipelines call it)."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    defaults: ClassVar[Mapping[str, Any]] = {
        **BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
    }

    def _check_config(self) -> None:
        super()._check_config()
        check_sigma_options(self)
        require_choice(self.name, self.config, "interpolation_type", ("linear", "log_linear"))
        require_choice(self.name, self.config, "timestep_type", ("discrete", "continuous"))
        require_choice(self.name, self.config, "final_sigmas_type", ("zero", "sigma_min"))

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        timesteps, sigmas, log_table = self._train_sigma_schedule(num_inference_steps)
        if cfg["interpolation_type"] == "log_linear":
            # One longer than the timesteps, as diffusers has it: the last step ends at the
            # smallest training sigma rather than 0.
            logs = torch_linspace(log_table[-1], log_table[0], num_inference_steps + 1)
            sigmas = _exp32(logs)
        if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]:
            sigma_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sigmas[-1])
            sigma_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sigmas[0])
            convert = karras_sigmas if cfg["use_karras_sigmas"] else exponential_sigmas
            sigmas = convert(sigma_min, sigma_max, num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_table)
        last = np.float32(0)
        if cfg["final_sigmas_type"] == "sigma_min":
            last = train_sigmas(self.alphas_cumprod[:1])[0]
        sigmas = np.append(sigmas, last).astype(np.float32)
        if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
            timesteps = np.float32(0.25) * _log32(sigmas[:-1])
        self._reset(num_inference_steps, timesteps, sigmas)

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: NoiseSource | None = None,
    ) -> np.ndarray:
        index = self._index(timestep)
        sample = sample.astype(np.float32)
        sigma = self.sigmas[index]
        derivative = (sample - self._denoised(model_output, sample, sigma)) / sigma
        prev_sample = sample + derivative * (self.sigmas[index + 1] - sigma)
        self._step_index = index + 1
        return prev_sample.astype(model_output.dtype)


class EulerAncestralDiscrete(SigmaScheduler):
    """diffusers' EulerAncestralDiscreteScheduler: an Euler step down to sigma_down, then
    fresh noise of sigma_up (drawn on every step, the last included, as diffusers does)."""

    name = "euler-ancestral"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    prediction_types = ("epsilon", "v_prediction")
    defaults: ClassVar[Mapping[str, Any]] = {
        **BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }

    def set_timesteps(self, num_inference_steps: int) -> None:
        timesteps, sigmas, _ = self._train_sigma_schedule(num_inference_steps)
        self._reset(num_inference_steps, timesteps, np.append(sigmas, 0.0))

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: NoiseSource | None = None,
    ) -> np.ndarray:
        index = self._index(timestep)
        sample = sample.astype(np.float32)
        sigma, sigma_to = self.sigmas[index], self.sigmas[index + 1]
        denoised = self._denoised(model_output, sample, sigma)
        from2, to2 = sigma * sigma, sigma_to * sigma_to
        sigma_up = np.sqrt(to2 * (from2 - to2) / from2)
        sigma_down = np.sqrt(to2 - sigma_up * sigma_up)
        derivative = (sample - denoised) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        prev_sample = prev_sample + draw_noise(generator, model_output.shape) * sigma_up
        self._step_index = index + 1
        return prev_sample.astype(model_output.dtype)


__all__ = ["EulerAncestralDiscrete", "EulerDiscrete", "SigmaScheduler", "check_sigma_options"]
