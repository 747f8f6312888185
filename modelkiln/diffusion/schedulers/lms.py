"""Linear multistep (k-diffusion's sample_lms) as diffusers' LMSDiscreteScheduler runs it.

diffusers integrates each Lagrange basis polynomial with scipy.integrate.quad; they are
polynomials of degree at most 3, so numpy.polynomial integrates them exactly instead (quad's
result differs by its float32 evaluation of the integrand: ~1e-7 relative).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.polynomial import Polynomial

from modelkiln.diffusion.schedulers.base import NoiseSource
from modelkiln.diffusion.schedulers.common import (
    BETA_DEFAULTS,
    exponential_sigmas,
    karras_sigmas,
    sigma_to_t,
)
from modelkiln.diffusion.schedulers.euler import SigmaScheduler, check_sigma_options

# diffusers' step(order=4) default: the pipelines never pass another.
_ORDER = 4


def lms_coefficient(sigmas: np.ndarray, order: int, index: int, current: int) -> float:
    """The integral from sigmas[index] to sigmas[index + 1] of the Lagrange basis polynomial
    that is 1 at sigmas[index - current] and 0 at the other sigmas[index - k], k < order."""
    at = float(sigmas[index - current])
    basis = Polynomial([1.0])
    for k in range(order):
        if k != current:
            node = float(sigmas[index - k])
            basis = basis * Polynomial([-node, 1.0]) / (at - node)
    antiderivative = basis.integ()
    return float(antiderivative(float(sigmas[index + 1])) - antiderivative(float(sigmas[index])))


class LMSDiscrete(SigmaScheduler):
    """diffusers' LMSDiscreteScheduler (order 4)."""

    name = "lms"
    diffusers_class = "LMSDiscreteScheduler"
    defaults: ClassVar[Mapping[str, Any]] = {
        **{k: v for k, v in BETA_DEFAULTS.items() if k != "rescale_betas_zero_snr"},
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.derivatives: list[np.ndarray] = []

    def _check_config(self) -> None:
        super()._check_config()
        check_sigma_options(self)

    def set_timesteps(self, num_inference_steps: int) -> None:
        timesteps, sigmas, log_table = self._train_sigma_schedule(num_inference_steps)
        if self.config["use_karras_sigmas"] or self.config["use_exponential_sigmas"]:
            convert = karras_sigmas if self.config["use_karras_sigmas"] else exponential_sigmas
            sigmas = convert(float(sigmas[-1]), float(sigmas[0]), num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_table)
        self._reset(num_inference_steps, timesteps, np.append(sigmas, 0.0))
        self.derivatives = []

    def step(
        self,
        model_output: np.ndarray,
        timestep: float,
        sample: np.ndarray,
        generator: NoiseSource | None = None,
    ) -> np.ndarray:
        index = self._index(timestep)
        sigma = self.sigmas[index]
        derivative = (sample - self._denoised(model_output, sample, sigma)) / sigma
        self.derivatives.append(derivative)
        if len(self.derivatives) > _ORDER:
            self.derivatives.pop(0)
        order = min(index + 1, _ORDER)
        coefficients = [lms_coefficient(self.sigmas, order, index, j) for j in range(order)]
        # Summed in diffusers' order; after set_begin_index fewer derivatives than
        # coefficients exist, and zip drops the extra ones as diffusers' does.
        update: Any = 0
        for coefficient, past in zip(coefficients, reversed(self.derivatives), strict=False):
            update = update + coefficient * past
        self._step_index = index + 1
        return np.asarray(sample + update, dtype=sample.dtype)


__all__ = ["LMSDiscrete", "lms_coefficient"]
