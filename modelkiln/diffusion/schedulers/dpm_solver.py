"""DPM-Solver(++) multistep (arXiv:2206.00927, 2211.01095): diffusers'
DPMSolverMultistepScheduler in numpy. "dpmpp-2m" is its default (DPM-Solver++, order 2,
midpoint); "dpmpp-2m-karras" adds use_karras_sigmas.

Each step turns the model output into a data (x0) prediction (DPM-Solver: a noise
prediction), keeps the last `solver_order` of them, and extrapolates in lambda = log(alpha /
sigma) with as many as it has; final steps drop to lower orders for stability."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from modelkiln.diffusion.schedulers.base import NoiseSource
from modelkiln.diffusion.schedulers.common import (
    BETA_DEFAULTS,
    draw_noise,
    karras_sigmas,
    require_choice,
    sigma_to_t,
    threshold_sample,
)
from modelkiln.diffusion.schedulers.multistep import (
    F32,
    VPMultistep,
    combine,
    exp32,
    multistep_timesteps,
    quiet_float,
    refuse_if,
)

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")


class DPMSolverMultistep(VPMultistep):
    """diffusers' DPMSolverMultistepScheduler (algorithm_type dpmsolver++, dpmsolver or
    sde-dpmsolver++; solver_order 1-3; midpoint or heun; optionally Karras sigmas)."""

    name = "dpmpp-2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    defaults: ClassVar[Mapping[str, Any]] = {
        **BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        # lambda(t) of the training schedule, for lambda_min_clipped.
        alpha, sigma = np.sqrt(self.alphas_cumprod), np.sqrt(1 - self.alphas_cumprod)
        self.train_lambdas = np.log(alpha) - np.log(sigma)

    def _check_common(self) -> None:
        super()._check_common()
        config, owner = self.config, self.diffusers_class
        # diffusers maps these names to its own defaults rather than refusing them.
        if config["algorithm_type"] == "deis":
            config["algorithm_type"] = "dpmsolver++"
        if config["solver_type"] in ("logrho", "bh1", "bh2"):
            config["solver_type"] = "midpoint"
        require_choice(owner, config, "algorithm_type", ALGORITHMS)
        require_choice(owner, config, "solver_type", ("midpoint", "heun"))
        require_choice(owner, config, "use_lu_lambdas", (False,))
        require_choice(owner, config, "variance_type", (None,))
        algorithm, final = config["algorithm_type"], config["final_sigmas_type"]
        # diffusers raises here too: without ++ the zero final sigma divides by zero.
        refuse_if(
            algorithm == "dpmsolver" and final == "zero",
            owner,
            "final_sigmas_type",
            final,
            "algorithm_type dpmsolver needs final_sigmas_type sigma_min",
        )

    def set_timesteps(self, num_inference_steps: int) -> None:
        steps = int(num_inference_steps)
        timesteps = multistep_timesteps(self.config, steps, self._last_timestep())
        if self.config["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(self.train_sigmas[0]), float(self.train_sigmas[-1]), steps)
            fractional = sigma_to_t(sigmas, np.log(self.train_sigmas))
            # diffusers rounds these except for the cosine schedule, where it truncates.
            if self.config["beta_schedule"] != "squaredcos_cap_v2":
                fractional = fractional.round()
            timesteps = fractional.astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        self._set_schedule(timesteps, np.concatenate([sigmas, [self._final_sigma()]]))

    def _last_timestep(self) -> int:
        """One past the last training timestep whose lambda is above lambda_min_clipped."""
        clipped = np.searchsorted(self.train_lambdas[::-1], self.config["lambda_min_clipped"])
        return int(self.config["num_train_timesteps"]) - int(clipped)

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: NoiseSource | None = None,
    ) -> np.ndarray:
        index = self._start_step(timestep)
        steps, config = len(self.timesteps), self.config
        few = config["lower_order_final"] and steps < 15
        last_first_order = index == steps - 1 and (
            config["euler_at_final"] or few or config["final_sigmas_type"] == "zero"
        )
        last_second_order = index == steps - 2 and few
        converted = self._convert(model_output, sample, index)
        self.model_outputs = [*self.model_outputs[1:], converted]
        sample = sample.astype(np.float32)
        noise = None
        if config["algorithm_type"] == "sde-dpmsolver++":
            noise = draw_noise(generator, converted.shape)
        order = config["solver_order"]
        if order == 1 or self.lower_order_nums < 1 or last_first_order:
            used = 1
        elif order == 2 or self.lower_order_nums < 2 or last_second_order:
            used = 2
        else:
            used = 3
        # A zero final sigma makes h infinite, a repeated last sigma makes it 0: the terms
        # that become inf or NaN are those of orders not used then (torch does not warn).
        with quiet_float():
            prev = self._update(used, index, sample, noise)
        self.lower_order_nums = min(self.lower_order_nums + 1, order)
        self._step_index = index + 1
        return prev.astype(model_output.dtype)

    def _convert(self, model_output: np.ndarray, sample: np.ndarray, index: int) -> np.ndarray:
        """The data prediction (DPM-Solver++) or noise prediction (DPM-Solver) the solver
        integrates, from what the model predicts."""
        alpha, sigma, _ = self.alpha_sigma(index)
        prediction, config = self.config["prediction_type"], self.config
        if config["algorithm_type"] == "dpmsolver":
            if prediction == "epsilon":
                eps = model_output
            elif prediction == "v_prediction":
                eps = alpha * model_output + sigma * sample
            else:
                eps = (sample - alpha * model_output) / sigma
            if config["thresholding"]:
                # diffusers thresholds the x0 this implies, then goes back to noise.
                x0 = self._threshold((sample - sigma * eps) / alpha)
                eps = (sample - alpha * x0) / sigma
            return eps
        if prediction == "epsilon":
            x0 = (sample - sigma * model_output) / alpha
        elif prediction == "v_prediction":
            x0 = alpha * sample - sigma * model_output
        else:
            x0 = model_output
        return self._threshold(x0) if config["thresholding"] else x0

    def _threshold(self, x0: np.ndarray) -> np.ndarray:
        ratio, top = self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"]
        return threshold_sample(x0, ratio, top)

    def _update(
        self, order: int, index: int, sample: np.ndarray, noise: np.ndarray | None
    ) -> np.ndarray:
        """One multistep update of `order` from sigmas[index] to sigmas[index + 1]."""
        alpha_t, sigma_t, lambda_t = self.alpha_sigma(index + 1)
        alpha_s0, sigma_s0, lambda_s0 = self.alpha_sigma(index)
        h = lambda_t - lambda_s0
        c = self._coefficients(h, alpha_t, sigma_t, alpha_s0, sigma_s0)
        m = [out for out in self.model_outputs[::-1] if out is not None]
        terms = [(c["x"], sample), (c["d0"], m[0])]
        if order == 2:
            lambda_s1 = self.alpha_sigma(index - 1)[2]
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = (F32(1.0) / r0) * (m[0] - m[1])
            terms.append((c["d1_" + self.config["solver_type"]], d1))
        elif order == 3:
            lambda_s1 = self.alpha_sigma(index - 1)[2]
            lambda_s2 = self.alpha_sigma(index - 2)[2]
            r0, r1 = (lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h
            d1_0 = (F32(1.0) / r0) * (m[0] - m[1])
            d1_1 = (F32(1.0) / r1) * (m[1] - m[2])
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (F32(1.0) / (r0 + r1)) * (d1_0 - d1_1)
            terms += [(c["d1_heun"], d1), (c["d2"], d2)]
        if noise is not None:
            terms.append((c["noise"], noise))
        return combine(terms)

    def _coefficients(
        self,
        h: np.float32,
        alpha_t: np.float32,
        sigma_t: np.float32,
        alpha_s0: np.float32,
        sigma_s0: np.float32,
    ) -> dict[str, np.float32]:
        """The float32 coefficients of sample, D0, D1 (midpoint / heun), D2 and noise in
        diffusers' update formulas, signs folded in, rounded in its order of operations."""
        one, half = F32(1.0), F32(0.5)
        algorithm = self.config["algorithm_type"]
        if algorithm == "dpmsolver++":
            e = exp32(-h) - one
            return {
                "x": sigma_t / sigma_s0,
                "d0": -(alpha_t * e),
                "d1_midpoint": -(half * (alpha_t * e)),
                "d1_heun": alpha_t * (e / h + one),
                "d2": -(alpha_t * ((e + h) / (h * h) - half)),
            }
        if algorithm == "dpmsolver":
            e = exp32(h) - one
            return {
                "x": alpha_t / alpha_s0,
                "d0": -(sigma_t * e),
                "d1_midpoint": -(half * (sigma_t * e)),
                "d1_heun": -(sigma_t * (e / h - one)),
                "d2": -(sigma_t * ((e - h) / (h * h) - half)),
            }
        q = one - exp32(F32(-2.0) * h)  # sde-dpmsolver++
        two_h = F32(2.0) * h
        return {
            "x": (sigma_t / sigma_s0) * exp32(-h),
            "d0": alpha_t * q,
            "d1_midpoint": half * (alpha_t * q),
            "d1_heun": alpha_t * (q / -two_h + one),
            "d2": alpha_t * ((q - two_h) / (two_h * two_h) - half),
            "noise": sigma_t * np.sqrt(q),
        }


__all__ = ["DPMSolverMultistep"]
