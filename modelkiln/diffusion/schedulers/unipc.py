"""UniPC (arXiv:2302.04867): diffusers' UniPCMultistepScheduler in numpy.

Each step first corrects the sample the previous step predicted (UniC, using the model's
output at it), then predicts the next one (UniP) from the last `solver_order` data (or
noise) predictions, extrapolated in lambda = log(alpha / sigma). B(h) is h ("bh1") or
e^h - 1 ("bh2"); the weights rho solve a small float32 linear system, as diffusers'."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from modelkiln.diffusion.schedulers.base import NoiseSource
from modelkiln.diffusion.schedulers.common import (
    BETA_DEFAULTS,
    karras_sigmas,
    require_choice,
    sigma_to_t,
    threshold_sample,
)
from modelkiln.diffusion.schedulers.multistep import (
    F32,
    VPMultistep,
    combine,
    expm1_32,
    multistep_timesteps,
    quiet_float,
    refuse_if,
)


class UniPCMultistep(VPMultistep):
    """diffusers' UniPCMultistepScheduler (bh1/bh2, solver_order 1-3, data or noise
    prediction, optionally Karras sigmas)."""

    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    defaults: ClassVar[Mapping[str, Any]] = {
        **BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": (),
        "solver_p": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.last_sample: np.ndarray | None = None
        self.this_order = 0

    def _check_common(self) -> None:
        super()._check_common()
        config, owner = self.config, self.diffusers_class
        # diffusers maps DPM-Solver's solver types to bh2 rather than refusing them.
        if config["solver_type"] in ("midpoint", "heun", "logrho"):
            config["solver_type"] = "bh2"
        require_choice(owner, config, "solver_type", ("bh1", "bh2"))
        # A scheduler object cannot come from a JSON config; shifting is for flow sigmas.
        require_choice(owner, config, "solver_p", (None,))
        require_choice(owner, config, "use_dynamic_shifting", (False,))
        require_choice(owner, config, "shift_terminal", (None,))
        lower_final = bool(config["lower_order_final"])
        refuse_if(
            not lower_final
            and config["final_sigmas_type"] == "zero"
            and config["solver_order"] > 1,
            owner,
            "lower_order_final",
            lower_final,
            "a multistep last step to a zero final sigma divides by zero (diffusers: inf/NaN)",
        )

    def set_timesteps(self, num_inference_steps: int) -> None:
        steps, config = int(num_inference_steps), self.config
        timesteps = multistep_timesteps(config, steps, int(config["num_train_timesteps"]))
        final = self._final_sigma()
        if config["use_karras_sigmas"]:
            low = config["sigma_min"] if config["sigma_min"] is not None else self.train_sigmas[0]
            high = config["sigma_max"] if config["sigma_max"] is not None else self.train_sigmas[-1]
            sigmas = karras_sigmas(float(low), float(high), steps)
            timesteps = sigma_to_t(sigmas, np.log(self.train_sigmas)).round()
            # Unlike DPM-Solver, the "sigma_min" final sigma is the last Karras sigma.
            final = float(sigmas[-1]) if config["final_sigmas_type"] == "sigma_min" else 0.0
        else:
            sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        self._set_schedule(timesteps, np.concatenate([sigmas, [final]]))

    def _set_schedule(self, timesteps: np.ndarray, sigmas: Sequence[float] | np.ndarray) -> None:
        super()._set_schedule(timesteps, sigmas)
        self.last_sample = None
        self.this_order = 0

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: NoiseSource | None = None,
    ) -> np.ndarray:
        index = self._start_step(timestep)
        config = self.config
        corrects = (
            index > 0
            and index - 1 not in config["disable_corrector"]
            and self.last_sample is not None
        )
        converted = self._convert(model_output, sample, index)
        # h is infinite towards a zero final sigma and 0 towards a repeated one; the terms
        # that become inf or NaN then go unused (torch does not warn).
        if corrects:
            with quiet_float():
                sample = self._corrector(converted, index)
        self.model_outputs = [*self.model_outputs[1:], converted]
        order = int(config["solver_order"])
        if config["lower_order_final"]:
            order = min(order, len(self.timesteps) - index)
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up
        self.last_sample = sample
        with quiet_float():
            prev = self._predictor(sample, index, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, int(config["solver_order"]))
        self._step_index = index + 1
        return prev.astype(sample.dtype)

    def _convert(self, model_output: np.ndarray, sample: np.ndarray, index: int) -> np.ndarray:
        """The data prediction (predict_x0) or noise prediction the solver integrates."""
        alpha, sigma, _ = self.alpha_sigma(index)
        prediction = self.config["prediction_type"]
        if self.config["predict_x0"]:
            if prediction == "epsilon":
                x0 = (sample - sigma * model_output) / alpha
            elif prediction == "v_prediction":
                x0 = alpha * sample - sigma * model_output
            else:
                x0 = model_output
            if self.config["thresholding"]:
                ratio = self.config["dynamic_thresholding_ratio"]
                x0 = threshold_sample(x0, ratio, self.config["sample_max_value"])
            return x0
        if prediction == "epsilon":
            return model_output
        if prediction == "v_prediction":
            return alpha * model_output + sigma * sample
        return (sample - alpha * model_output) / sigma

    def _predictor(self, sample: np.ndarray, index: int, order: int) -> np.ndarray:
        """UniP: from sigmas[index] to sigmas[index + 1] with `order` model outputs."""
        outputs = self._outputs()
        history = [(index - k, outputs[k]) for k in range(1, order)]
        base, c_b, rows, b, d1s = self._bh(index + 1, index, history, outputs[0], sample)
        if not d1s:
            # diffusers subtracts c_b * 0 here, NaN when c_b is infinite (bh1 to sigma 0).
            return base
        if order == 2:
            rhos = np.array([0.5], dtype=np.float32)
        else:
            rhos = np.linalg.solve(rows[:-1, :-1], b[:-1]).astype(np.float32)
        return base - c_b * combine(list(zip(rhos, d1s, strict=True)))

    def _corrector(self, converted: np.ndarray, index: int) -> np.ndarray:
        """UniC: the sample predicted at sigmas[index], corrected with the model's output
        there (`converted`), using the previous step's order."""
        assert self.last_sample is not None
        order, outputs = self.this_order, self._outputs()
        history = [(index - k - 1, outputs[k]) for k in range(1, order)]
        base, c_b, rows, b, d1s = self._bh(index, index - 1, history, outputs[0], self.last_sample)
        if order == 1:
            rhos = np.array([0.5], dtype=np.float32)
        else:
            rhos = np.linalg.solve(rows, b).astype(np.float32)
        correction = rhos[-1] * (converted - outputs[0])
        if d1s:
            correction = combine(list(zip(rhos[:-1], d1s, strict=True))) + correction
        return base - c_b * correction

    def _outputs(self) -> list[np.ndarray]:
        """The stored model outputs, newest first."""
        return [out for out in self.model_outputs[::-1] if out is not None]

    def _bh(
        self,
        t: int,
        s0: int,
        history: list[tuple[int, np.ndarray]],
        m0: np.ndarray,
        x: np.ndarray,
    ) -> tuple[np.ndarray, np.float32, np.ndarray, np.ndarray, list[np.ndarray]]:
        """What UniP and UniC share for a step from sigmas[s0] to sigmas[t]: the first-order
        step from x, B(h) times its alpha (or sigma), the system R rho = b, and the scaled
        differences D1 of the older outputs (sigma index, output) in `history`."""
        alpha_t, sigma_t, lambda_t = self.alpha_sigma(t)
        alpha_s0, sigma_s0, lambda_s0 = self.alpha_sigma(s0)
        h = lambda_t - lambda_s0
        rks, d1s = [], []
        for si, mi in history:
            rk = (self.alpha_sigma(si)[2] - lambda_s0) / h
            rks.append(rk)
            d1s.append((mi - m0) / rk)
        rks.append(F32(1.0))
        ratios = np.array(rks, dtype=np.float32)
        hh = -h if self.config["predict_x0"] else h
        h_phi_1 = expm1_32(hh)
        b_h = hh if self.config["solver_type"] == "bh1" else expm1_32(hh)
        rows, b = [], []
        h_phi_k, factorial = h_phi_1 / hh - F32(1.0), 1
        for i in range(1, len(rks) + 1):
            rows.append(ratios ** (i - 1))
            b.append((h_phi_k * F32(factorial)) / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - F32(1 / factorial)
        if self.config["predict_x0"]:
            c_x, c_m, c_b = sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h
        else:
            c_x, c_m, c_b = alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * b_h
        base = combine([(c_x, x), (-c_m, m0)])
        return base, c_b, np.array(rows, dtype=np.float32), np.array(b, dtype=np.float32), d1s


__all__ = ["UniPCMultistep"]
