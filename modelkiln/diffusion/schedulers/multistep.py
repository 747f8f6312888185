"""What DPMSolverMultistep and UniPCMultistep share: diffusers' variance-preserving schedule
for its multistep solvers (integer timesteps, sigma = sqrt((1 - alpha_bar) / alpha_bar) per
step plus a final sigma), the step counter, add_noise, and float32 scalar math done the way
diffusers does it on 0-d torch tensors, so that the steps agree to float32 rounding."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from modelkiln.diffusion.schedulers.base import Scheduler
from modelkiln.diffusion.schedulers.common import (
    alphas_cumprod,
    require_choice,
    train_betas,
    train_sigmas,
)
from modelkiln.errors import InputError, UnsupportedError

F32 = np.float32


def log32(x: np.float32) -> np.float32:
    """torch.log of a 0-d float32 tensor, which is correctly rounded (numpy's float32 log is
    not always); log(0) is -inf, as the zero final sigma needs."""
    value = float(x)
    return F32(math.log(value)) if value > 0 else F32(-math.inf)


def exp32(x: np.float32) -> np.float32:
    """torch.exp of a 0-d float32 tensor, to within its rounding: exp in float64, rounded."""
    with np.errstate(over="ignore"):
        return F32(np.exp(np.float64(x)))


def expm1_32(x: np.float32) -> np.float32:
    """torch.expm1 of a 0-d float32 tensor, to within its rounding."""
    with np.errstate(over="ignore"):
        return F32(np.expm1(np.float64(x)))


def quiet_float() -> np.errstate:
    """Silence numpy's float warnings, as torch's scalar math is silent: the solvers' unused
    terms go inf or NaN at a zero final sigma (h = inf) or a repeated one (h = 0)."""
    return np.errstate(divide="ignore", invalid="ignore", over="ignore")


def combine(terms: Sequence[tuple[np.float32, np.ndarray]]) -> np.ndarray:
    """c0 * x0 + c1 * x1 + ..., each product and sum rounded to float32 left to right as the
    torch expressions in diffusers are (signs are folded into the coefficients: exact)."""
    coefficient, array = terms[0]
    out: np.ndarray = coefficient * array
    for coefficient, array in terms[1:]:
        out = out + coefficient * array
    return np.asarray(out, dtype=np.float32)


def multistep_timesteps(config: Mapping[str, Any], steps: int, last: int) -> np.ndarray:
    """diffusers' DPM-Solver/UniPC `timestep_spacing` (arXiv:2305.08891, Table 2): int64,
    descending, from training timesteps below `last` (DPM-Solver's lambda clipping)."""
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        spaced = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
        return spaced.astype(np.int64)
    if spacing == "leading":
        every = last // (steps + 1)
        spaced = (np.arange(0, steps + 1) * every).round()[::-1][:-1].astype(np.int64)
        return spaced + int(config["steps_offset"])
    if spacing == "trailing":
        ratio = int(config["num_train_timesteps"]) / steps
        return np.arange(last, 0, -ratio).round().astype(np.int64) - 1
    raise UnsupportedError(
        f"timestep_spacing '{spacing}' is not supported; supported: linspace, leading, trailing"
    )


def refuse_if(condition: bool, scheduler: str, key: str, value: Any, supported: str) -> None:
    """One-line UnsupportedError for a config combination we do not reproduce."""
    if condition:
        raise UnsupportedError(f"{scheduler}: {key}={value!r} is not supported; {supported}")


class VPMultistep(Scheduler):
    """The part of diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler that is
    the same: training sigmas, inference `timesteps`/`sigmas`, step counting, add_noise."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self._check_common()
        cumprod = alphas_cumprod(train_betas(self.config))
        if self.config["rescale_betas_zero_snr"]:
            # As diffusers: near zero but not zero, so the first sigma stays finite.
            cumprod[-1] = 2.0**-24
        self.alphas_cumprod = cumprod
        self.train_sigmas = train_sigmas(cumprod)
        self.sigmas = np.zeros(0, dtype=np.float32)
        self.model_outputs: list[np.ndarray | None] = []
        self.lower_order_nums = 0

    def _check_common(self) -> None:
        """Refuse the options of these classes that only flow-matching models use."""
        owner, config = self.diffusers_class, self.config
        for key in ("use_flow_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            require_choice(owner, config, key, (False,))
        require_choice(owner, config, "prediction_type", ("epsilon", "v_prediction", "sample"))
        require_choice(owner, config, "timestep_spacing", ("linspace", "leading", "trailing"))
        require_choice(owner, config, "final_sigmas_type", ("zero", "sigma_min"))
        order = config["solver_order"]
        refuse_if(order not in (1, 2, 3), owner, "solver_order", order, "supported: 1, 2, 3")

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def _set_schedule(self, timesteps: np.ndarray, sigmas: Sequence[float] | np.ndarray) -> None:
        """Install a new schedule and forget the previous run, as diffusers' set_timesteps."""
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.sigmas = np.asarray(sigmas).astype(np.float32)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * int(self.config["solver_order"])
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _final_sigma(self) -> float:
        """The sigma after the last step: 0, or the smallest training sigma."""
        if self.config["final_sigmas_type"] == "sigma_min":
            return float(self.train_sigmas[0])
        return 0.0

    def _index_of(self, timestep: float) -> int:
        """Where a step at `timestep` starts: its second occurrence if repeated (so that a run
        starting mid-schedule skips no sigma); the last step if absent, as diffusers does."""
        matches = np.flatnonzero(self.timesteps == timestep)
        if len(matches) == 0:
            return len(self.timesteps) - 1
        return int(matches[1] if len(matches) > 1 else matches[0])

    def _start_step(self, timestep: float) -> int:
        """The index of this step, initialising the counter on the first one."""
        if self.num_inference_steps is None:
            raise InputError(f"{self.diffusers_class}: call set_timesteps before step")
        self._index(timestep)
        assert self._step_index is not None
        if self._step_index >= len(self.timesteps):
            # diffusers raises IndexError: a repeated first timestep started the run at the
            # second occurrence, or step was called after the last timestep.
            raise InputError(
                f"{self.diffusers_class}: step {self._step_index + 1} of a "
                f"{len(self.timesteps)}-step schedule; call set_begin_index(0) before the "
                "first step when timesteps repeat"
            )
        return self._step_index

    def alpha_sigma(self, index: int) -> tuple[np.float32, np.float32, np.float32]:
        """(alpha_t, sigma_t, lambda_t) at sigmas[index]: alpha = 1/sqrt(sigma^2 + 1), sigma_t =
        sigma * alpha, lambda = log(alpha) - log(sigma_t), each rounded to float32."""
        sigma = self.sigmas[index]
        alpha = F32(1.0) / np.sqrt(sigma * sigma + F32(1.0))
        sigma_t = sigma * alpha
        return alpha, sigma_t, log32(alpha) - log32(sigma_t)

    def add_noise(
        self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray
    ) -> np.ndarray:
        """alpha_t * original + sigma_t * noise at the step's sigma (diffusers' add_noise)."""
        sigma = self.sigmas.astype(original.dtype)[self._noise_indices(timesteps)]
        sigma = sigma.reshape(sigma.shape + (1,) * (original.ndim - 1))
        alpha = 1 / np.sqrt(sigma * sigma + 1)
        return np.asarray(alpha * original + (sigma * alpha) * noise)


__all__ = [
    "F32",
    "VPMultistep",
    "combine",
    "exp32",
    "expm1_32",
    "log32",
    "multistep_timesteps",
    "quiet_float",
]
