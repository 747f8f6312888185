"""Latent Consistency Model sampling (Luo et al., arXiv:2310.04378) as diffusers' LCMScheduler
runs it, in numpy: each step predicts the clean sample (`denoised`) through the consistency
boundary condition, then re-noises it to the next timestep with fresh noise, except on the
last step, which returns `denoised` itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from modelkiln.diffusion.schedulers.base import NoiseSource, Scheduler
from modelkiln.diffusion.schedulers.common import (
    BETA_DEFAULTS,
    alpha_schedule,
    draw_noise,
    require_choice,
)
from modelkiln.diffusion.schedulers.ddim import add_noise_alpha, clip_original, predict_original
from modelkiln.errors import InputError

_SIGMA_DATA = np.float32(0.5)


class LCM(Scheduler):
    """diffusers' LCMScheduler. Its step returns prev_sample; the step's denoised sample
    (diffusers' second output) stays in `denoised`."""

    name = "lcm"
    diffusers_class = "LCMScheduler"
    # LCMScheduler also takes timestep_spacing and steps_offset, and never reads them.
    defaults: ClassVar[Mapping[str, Any]] = {
        **BETA_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_scaling": 10.0,
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        require_choice(
            self.name, self.config, "prediction_type", ("epsilon", "sample", "v_prediction")
        )
        self.alphas_cumprod, self.final_alpha_cumprod = alpha_schedule(self.config)
        count = int(self.config["num_train_timesteps"])
        self.timesteps = np.arange(count - 1, -1, -1, dtype=np.int64)
        self.denoised: np.ndarray | None = None

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        original_inference_steps: int | None = None,
        strength: float = 1.0,
    ) -> None:
        """`steps` timesteps evenly picked (rounded down) from the distillation schedule of
        `original_inference_steps` (the config's by default); image-to-image passes its
        strength, which keeps only the first strength-fraction of that schedule."""
        count = int(self.config["num_train_timesteps"])
        original = int(original_inference_steps or self.config["original_inference_steps"])
        if original > count:
            raise InputError(
                f"original_inference_steps {original} exceeds num_train_timesteps {count}"
            )
        origin = (
            np.arange(1, int(original * strength) + 1, dtype=np.int64) * (count // original) - 1
        )
        if num_inference_steps > min(len(origin), original):
            raise InputError(
                f"LCM cannot take {num_inference_steps} steps from a schedule of "
                f"{len(origin)} (original_inference_steps {original} x strength {strength})"
            )
        picks = np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)
        self.timesteps = origin[::-1][np.floor(picks).astype(np.int64)]
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self._begin_index = None

    def _scalings(self, timestep: int) -> tuple[Any, Any]:
        """(c_skip, c_out) of the consistency boundary condition, in float32 as diffusers'
        tensor timesteps give them."""
        scaled = np.float32(timestep) * np.float32(self.config["timestep_scaling"])
        denominator = scaled * scaled + _SIGMA_DATA * _SIGMA_DATA
        return _SIGMA_DATA * _SIGMA_DATA / denominator, scaled / np.sqrt(denominator)

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: NoiseSource | None = None,
    ) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("LCM.step before set_timesteps")
        index, t = self._index(timestep), int(timestep)
        prev_t = int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else t
        alpha = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        c_skip, c_out = self._scalings(t)
        kind = self.config["prediction_type"]
        original = predict_original(kind, model_output, sample, alpha)[0]
        original = clip_original(self.config, original)
        denoised = c_out * original + c_skip * sample
        if index != self.num_inference_steps - 1:
            noise = draw_noise(generator, model_output.shape)
            prev_sample = np.sqrt(alpha_prev) * denoised + np.sqrt(1 - alpha_prev) * noise
        else:
            prev_sample = denoised
        self.denoised = denoised
        self._step_index = index + 1
        return prev_sample

    def add_noise(
        self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray
    ) -> np.ndarray:
        return add_noise_alpha(self.alphas_cumprod, original, noise, timesteps)


__all__ = ["LCM"]
