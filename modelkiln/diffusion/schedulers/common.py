"""What diffusers' discrete schedulers share: the training noise schedule (betas and their
cumulative alphas) in float32, as diffusers keeps it in torch float32 tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from modelkiln.diffusion.schedulers.base import NoiseSource
from modelkiln.errors import UnsupportedError

# The config keys (with diffusers' defaults) every discrete scheduler reads for its betas.
BETA_DEFAULTS: Mapping[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
}


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=torch.float32): float32 arithmetic, the first
    half counted up from start and the second half down from end, as its CPU kernel does."""
    first, last = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([first], dtype=np.float32)
    step = np.float64((last - first) / np.float32(steps - 1))
    index = np.arange(steps, dtype=np.float64)
    # Its vectorised kernel fuses the multiply-add: one rounding, as float64 then float32 gives.
    up = np.float64(first) + step * index
    down = np.float64(last) - step * (steps - 1 - index)
    return np.where(index < steps // 2, up, down).astype(np.float32)


def betas_for_alpha_bar(count: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine ("squaredcos_cap_v2") schedule, computed in float64 as diffusers does."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / count) / alpha_bar(i / count), max_beta) for i in range(count)
    ]
    return np.asarray(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas rescaled to zero terminal SNR (arXiv:2305.08891, Algorithm 1), in float32."""
    alphas_bar_sqrt = np.sqrt(alphas_cumprod(betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def train_betas(config: Mapping[str, Any]) -> np.ndarray:
    """The training betas a scheduler config describes (float32)."""
    count = int(config["num_train_timesteps"])
    schedule = config["beta_schedule"]
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif schedule == "linear":
        betas = torch_linspace(config["beta_start"], config["beta_end"], count)
    elif schedule == "scaled_linear":
        betas = torch_linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, count) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(count)
    else:
        raise UnsupportedError(
            f"beta_schedule '{schedule}' is not supported; supported: linear, scaled_linear, "
            "squaredcos_cap_v2"
        )
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas.astype(np.float32)


def alpha_schedule(config: Mapping[str, Any]) -> tuple[np.ndarray, np.float32]:
    """The cumulative alphas of the config's betas, and the one a DDIM-style step ends on
    (1 with set_alpha_to_one, else the first)."""
    cumulative = alphas_cumprod(train_betas(config))
    final = np.float32(1.0) if config["set_alpha_to_one"] else cumulative[0]
    return cumulative, final


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """torch.cumprod(1 - betas) for float32: torch's CPU kernel accumulates in float64 and
    rounds each product to float32."""
    return np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)


# --- Sigma schedules shared by the Karras-style options (use_karras_sigmas, ...) ---


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al.'s schedule (arXiv:2206.00364) from sigma_max down to sigma_min, in
    float64 as diffusers' `_convert_to_karras` computes it."""
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return np.asarray((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """Log-uniform sigmas from sigma_max to sigma_min (diffusers' `_convert_to_exponential`)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timesteps of `sigmas`: diffusers' `_sigma_to_t`, interpolating
    linearly in log sigma between the two neighbouring training sigmas. Same numpy dtypes as
    diffusers (float64 sigmas against float32 `log_sigmas`), so the rounding matches."""
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10)).reshape(-1)
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return np.asarray((1 - w) * low_idx + w * high_idx).reshape(sigmas.shape)


# --- Timestep spacing, step indexing and noise shared by the Euler/LMS/DDIM/PNDM/LCM family ---


TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def spaced_timesteps(config: Mapping[str, Any], steps: int) -> np.ndarray:
    """The `timestep_spacing` choices (arXiv:2305.08891, Table 2) as diffusers' discrete
    schedulers compute them: float64, descending; "linspace" is left unrounded (Euler and LMS
    keep its fractions, DDIM and PNDM round them)."""
    count = int(config["num_train_timesteps"])
    spacing = config["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, count - 1, steps)[::-1].copy()
    if spacing == "leading":
        ratio = count // steps
        return (np.arange(steps) * ratio)[::-1].astype(np.float64) + int(config["steps_offset"])
    if spacing == "trailing":
        return np.arange(count, 0, -count / steps).round() - 1
    raise UnsupportedError(
        f"timestep_spacing '{spacing}' is not supported; supported: linspace, leading, trailing"
    )


def train_sigmas(cumprod: np.ndarray) -> np.ndarray:
    """The training noise levels sqrt((1 - alpha_bar) / alpha_bar), float32, ascending in t.

    Correctly rounded; torch's float32 sqrt on x86 (MKL) is not always, so diffusers' tables
    can differ from these by 1 ulp in about 0.6% of entries."""
    return np.sqrt((np.float32(1.0) - cumprod) / cumprod).astype(np.float32)


def draw_noise(generator: NoiseSource | None, shape: tuple[int, ...]) -> np.ndarray:
    """A stochastic step's noise: from `generator` (torch.randn's values when it reproduces
    torch's stream); without one, fresh numpy noise (where diffusers uses torch's global RNG)."""
    if generator is None:
        return np.random.default_rng().standard_normal(shape, dtype=np.float32)
    return np.asarray(generator.randn(tuple(shape)), dtype=np.float32)


def require_choice(
    scheduler: str, config: Mapping[str, Any], key: str, supported: tuple[Any, ...]
) -> None:
    """Refuse a config value this implementation does not reproduce, naming what it does."""
    value = config[key]
    if isinstance(supported[0], bool):
        value = bool(value)
    if value not in supported:
        choices = ", ".join(str(choice) for choice in supported)
        raise UnsupportedError(
            f"{scheduler}: {key}={value!r} is not supported; supported: {choices}"
        )


def threshold_sample(sample: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Imagen, arXiv:2205.11487) as diffusers does it: per batch item,
    clip to s = the `ratio` quantile of |x| (clamped to [1, max_value]) and divide by s."""
    flat = sample.astype(np.float32).reshape(sample.shape[0], -1)
    s = np.quantile(np.abs(flat), ratio, axis=1).astype(np.float32)
    s = np.minimum(np.maximum(s, np.float32(1.0)), np.float32(max_value))[:, None]
    return (np.clip(flat, -s, s) / s).reshape(sample.shape).astype(sample.dtype)


__all__ = [
    "BETA_DEFAULTS",
    "TIMESTEP_SPACINGS",
    "alpha_schedule",
    "alphas_cumprod",
    "betas_for_alpha_bar",
    "draw_noise",
    "exponential_sigmas",
    "karras_sigmas",
    "require_choice",
    "rescale_zero_terminal_snr",
    "sigma_to_t",
    "spaced_timesteps",
    "threshold_sample",
    "torch_linspace",
    "train_betas",
    "train_sigmas",
]
