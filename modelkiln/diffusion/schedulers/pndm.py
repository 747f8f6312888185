"""PNDM (Liu et al., arXiv:2202.09778) as diffusers' PNDMScheduler runs it, in numpy.

With skip_prk_steps (Stable Diffusion's configs) it is pseudo linear multistep only, whose
second timestep repeats the first's successor: the first two model outputs are averaged
(a Heun-like warm-up) before the Adams-Bashforth formulas of rising order take over. Without
it, 12 pseudo Runge-Kutta evaluations start the run (diffusers' step_prk).
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
    require_choice,
    spaced_timesteps,
)
from modelkiln.diffusion.schedulers.ddim import add_noise_alpha
from modelkiln.errors import InputError

_PNDM_ORDER = 4


class PNDM(Scheduler):
    """diffusers' PNDMScheduler (Stable Diffusion 1.x's default)."""

    name = "pndm"
    diffusers_class = "PNDMScheduler"
    defaults: ClassVar[Mapping[str, Any]] = {
        **{k: v for k, v in BETA_DEFAULTS.items() if k != "rescale_betas_zero_snr"},
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        require_choice(self.name, self.config, "timestep_spacing", TIMESTEP_SPACINGS)
        require_choice(self.name, self.config, "prediction_type", ("epsilon", "v_prediction"))
        self.alphas_cumprod, self.final_alpha_cumprod = alpha_schedule(self.config)
        self.prk_timesteps = np.zeros(0, dtype=np.int64)
        self._reset_state()

    def _reset_state(self) -> None:
        self.ets: list[np.ndarray] = []
        self.counter = 0
        self.cur_model_output: Any = 0
        self.cur_sample: np.ndarray | None = None

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def _ratio(self) -> int:
        if self.num_inference_steps is None:
            raise RuntimeError("PNDM.step before set_timesteps")
        return int(self.config["num_train_timesteps"]) // self.num_inference_steps

    def set_timesteps(self, num_inference_steps: int) -> None:
        if not self.config["skip_prk_steps"] and num_inference_steps < _PNDM_ORDER:
            raise InputError(
                f"PNDM without skip_prk_steps needs at least {_PNDM_ORDER} steps, "
                f"not {num_inference_steps}"
            )
        self.num_inference_steps = num_inference_steps
        # ascending, as diffusers builds them
        spaced = spaced_timesteps(self.config, num_inference_steps)[::-1].round().astype(np.int64)
        if self.config["skip_prk_steps"]:
            self.prk_timesteps = np.zeros(0, dtype=np.int64)
            plms = np.concatenate([spaced[:-1], spaced[-2:-1], spaced[-1:]])[::-1]
        else:
            last = spaced[-_PNDM_ORDER:].repeat(2)
            last = last + np.tile(np.array([0, self._ratio() // 2]), _PNDM_ORDER)
            self.prk_timesteps = last[:-1].repeat(2)[1:-1][::-1].copy()
            plms = spaced[:-3][::-1]
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self._reset_state()

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: NoiseSource | None = None,
    ) -> np.ndarray:
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            prev_sample = self._step_prk(model_output, int(timestep), sample)
        else:
            prev_sample = self._step_plms(model_output, int(timestep), sample)
        self.counter += 1
        return prev_sample

    def _step_prk(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """One of the four evaluations of a pseudo Runge-Kutta step (RK4's 1/6, 1/3, 1/3, 1/6)."""
        phase = self.counter % 4
        prev_timestep = timestep - (0 if self.counter % 2 else self._ratio() // 2)
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        if phase == 0:
            self.cur_model_output = self.cur_model_output + (1 / 6) * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + (1 / 3) * model_output
        else:
            model_output = self.cur_model_output + (1 / 6) * model_output
            self.cur_model_output = 0
        base = self.cur_sample if self.cur_sample is not None else sample
        return self._prev_sample(base, timestep, prev_timestep, model_output)

    def _step_plms(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """A pseudo linear multistep step: Adams-Bashforth on the last (up to) four outputs."""
        if not self.config["skip_prk_steps"] and len(self.ets) < 3:
            raise RuntimeError("PNDM's plms steps need its 12 prk steps first")
        prev_timestep = timestep - self._ratio()
        if self.counter != 1:
            self.ets = [*self.ets[-3:], model_output]
        else:
            # the warm-up's second evaluation: redo the first step with the mean output
            prev_timestep, timestep = timestep, timestep + self._ratio()
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            assert self.cur_sample is not None
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._prev_sample(sample, timestep, prev_timestep, model_output)

    def _prev_sample(
        self, sample: np.ndarray, timestep: int, prev_timestep: int, model_output: np.ndarray
    ) -> np.ndarray:
        """x_{t-delta} from x_t and the noise estimate (the paper's eq. 11, diffusers' order)."""
        alpha = self.alphas_cumprod[timestep]
        alpha_prev = (
            self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        )
        beta, beta_prev = 1 - alpha, 1 - alpha_prev
        if self.config["prediction_type"] == "v_prediction":
            model_output = np.sqrt(alpha) * model_output + np.sqrt(beta) * sample
        sample_coeff = np.sqrt(alpha_prev / alpha)
        denominator = alpha * np.sqrt(beta_prev) + np.sqrt(alpha * beta * alpha_prev)
        return sample_coeff * sample - (alpha_prev - alpha) * model_output / denominator

    def add_noise(
        self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray
    ) -> np.ndarray:
        return add_noise_alpha(self.alphas_cumprod, original, noise, timesteps)


__all__ = ["PNDM"]
