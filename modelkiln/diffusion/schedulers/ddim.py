"""DDIM (Song et al., arXiv:2010.02502) as diffusers' DDIMScheduler runs it, in numpy.

Like diffusers, the previous timestep is always t - num_train_timesteps // steps, whatever
the spacing ("trailing" and "linspace" schedules then step to a point between their own
timesteps; that is diffusers' behaviour and so ours).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from modelkiln.diffusion.schedulers.base import NoiseSource, Scheduler
from modelkiln.diffusion.schedulers.common import (
    BETA_DEFAULTS,
    TIMESTEP_SPACINGS,
    alpha_schedule,
    draw_noise,
    require_choice,
    spaced_timesteps,
    threshold_sample,
)
from modelkiln.errors import InputError


def add_noise_alpha(
    cumprod: np.ndarray, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray
) -> np.ndarray:
    """sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) noise, one t per batch item or one for all
    (the forward process as DDIM, PNDM and LCM add it)."""
    cumprod = cumprod.astype(original.dtype)[np.atleast_1d(np.asarray(timesteps, dtype=np.int64))]
    shape = cumprod.shape + (1,) * (original.ndim - 1)
    sqrt_alpha = np.sqrt(cumprod).reshape(shape)
    sqrt_one_minus_alpha = np.sqrt(1 - cumprod).reshape(shape)
    return sqrt_alpha * original + sqrt_one_minus_alpha * noise


def predict_original(
    kind: str, model_output: np.ndarray, sample: np.ndarray, alpha: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted x0, predicted noise) from the model output of prediction type `kind`, at
    alpha_bar = `alpha` (a float32 scalar)."""
    beta = 1 - alpha
    if kind == "epsilon":
        return (sample - np.sqrt(beta) * model_output) / np.sqrt(alpha), model_output
    if kind == "sample":
        return model_output, (sample - np.sqrt(alpha) * model_output) / np.sqrt(beta)
    original = np.sqrt(alpha) * sample - np.sqrt(beta) * model_output
    return original, np.sqrt(alpha) * model_output + np.sqrt(beta) * sample


def clip_original(config: Mapping[str, Any], original: np.ndarray) -> np.ndarray:
    """The predicted x0 thresholded or clipped as the config's thresholding / clip_sample say."""
    if config["thresholding"]:
        ratio, max_value = config["dynamic_thresholding_ratio"], config["sample_max_value"]
        return threshold_sample(original, ratio, max_value)
    if config["clip_sample"]:
        limit = np.float32(config["clip_sample_range"])
        return np.clip(original, -limit, limit)
    return original


class DDIM(Scheduler):
    """diffusers' DDIMScheduler. `step(..., eta=)` is its eta (0 = deterministic DDIM, as the
    SD pipelines default to); with eta > 0 a step draws noise from its generator."""

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    defaults: ClassVar[Mapping[str, Any]] = {
        **BETA_DEFAULTS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        require_choice(self.name, self.config, "timestep_spacing", TIMESTEP_SPACINGS)
        require_choice(
            self.name, self.config, "prediction_type", ("epsilon", "sample", "v_prediction")
        )
        self.alphas_cumprod, self.final_alpha_cumprod = alpha_schedule(self.config)
        count = int(self.config["num_train_timesteps"])
        self.timesteps = np.arange(count - 1, -1, -1, dtype=np.int64)

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        count = int(self.config["num_train_timesteps"])
        if num_inference_steps > count:
            raise InputError(f"DDIM cannot take {num_inference_steps} steps of {count}")
        timesteps = spaced_timesteps(self.config, num_inference_steps)
        self.timesteps = timesteps.round().astype(np.int64)
        self.num_inference_steps = num_inference_steps

    def _alpha_prev(self, prev_timestep: int) -> Any:
        if prev_timestep >= 0:
            return self.alphas_cumprod[prev_timestep]
        return self.final_alpha_cumprod

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: NoiseSource | None = None,
        *,
        eta: float = 0.0,
    ) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("DDIM.step before set_timesteps")
        t = int(timestep)
        prev_t = t - int(self.config["num_train_timesteps"]) // self.num_inference_steps
        alpha, alpha_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
        original, epsilon = predict_original(
            self.config["prediction_type"], model_output, sample, alpha
        )
        original = clip_original(self.config, original)
        # sigma_t of the paper's eq. 16; eta = 0 makes the step deterministic
        variance = ((1 - alpha_prev) / (1 - alpha)) * (1 - alpha / alpha_prev)
        std_dev = np.float32(eta) * np.sqrt(variance)
        direction = np.sqrt(1 - alpha_prev - std_dev * std_dev) * epsilon
        prev_sample = np.sqrt(alpha_prev) * original + direction
        if eta > 0:
            prev_sample = prev_sample + std_dev * draw_noise(generator, model_output.shape)
        return prev_sample

    def add_noise(
        self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray
    ) -> np.ndarray:
        return add_noise_alpha(self.alphas_cumprod, original, noise, timesteps)


__all__ = ["DDIM", "add_noise_alpha", "clip_original", "predict_original"]
