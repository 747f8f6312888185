"""DPMSolverMultistep, UniPCMultistep and FlowMatchEulerDiscrete against diffusers, side by
side: the same timesteps and sigmas, then step after step from the same latents with the
same model output, both continuing from the reference's sample after each step."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tolerances import SIGMA_RTOL, STEP_ULPS

from modelkiln.diffusion.schedulers.base import Scheduler
from modelkiln.diffusion.schedulers.dpm_solver import DPMSolverMultistep
from modelkiln.diffusion.schedulers.flow_match import FlowMatchEulerDiscrete
from modelkiln.diffusion.schedulers.unipc import UniPCMultistep
from modelkiln.errors import InputError, UnsupportedError

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]
STEPS = [1, 2, 4, 20, 50]
RTOL, ATOL = 1e-5, 1e-6

# The scheduler configs the artifacts carry (keys of other classes included: ignored).
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "trained_betas": None,
}
SD21V = {**SD15, "prediction_type": "v_prediction"}
SDXL = {**SD15, "timestep_spacing": "leading", "interpolation_type": "linear"}
COSINE = {"beta_schedule": "squaredcos_cap_v2"}
ZERO_SNR = {**SD21V, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}

DPM_CASES: dict[str, Mapping[str, Any]] = {
    "sd15-linspace": {**SD15, "timestep_spacing": "linspace"},
    "sd15-leading": {**SD15, "timestep_spacing": "leading"},
    "sd15-trailing": {**SD15, "timestep_spacing": "trailing"},
    "sd21-v": SD21V,
    "sdxl": SDXL,
    "sdxl-karras": {**SDXL, "use_karras_sigmas": True},
    "order1": {**SD15, "solver_order": 1},
    "order3": {**SD15, "solver_order": 3},
    "order3-no-lower-final": {**SD15, "solver_order": 3, "lower_order_final": False},
    "heun": {**SD15, "solver_type": "heun"},
    "sigma-min-euler-final": {**SD15, "final_sigmas_type": "sigma_min", "euler_at_final": True},
    "karras-sigma-min": {**SD15, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    "dpmsolver": {**SD15, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    "dpmsolver-heun-o3": {
        **SD21V,
        "algorithm_type": "dpmsolver",
        "final_sigmas_type": "sigma_min",
        "solver_type": "heun",
        "solver_order": 3,
    },
    "sde-dpmsolver++": {**SD15, "algorithm_type": "sde-dpmsolver++"},
    "sde-heun-o3": {**SD15, "algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    "sample-prediction": {**SD15, "prediction_type": "sample"},
    # x0 from epsilon at sigma 14.6 is large: thresholding clips at a quantile up to 3.
    "thresholding": {**SD15, "thresholding": True, "sample_max_value": 3.0},
    "dpmsolver-thresholding": {
        **SD21V,
        "algorithm_type": "dpmsolver",
        "final_sigmas_type": "sigma_min",
        "thresholding": True,
        "sample_max_value": 3.0,
    },
    "cosine-clipped": {**COSINE, "lambda_min_clipped": -5.1, "timestep_spacing": "trailing"},
    "cosine-karras": {**COSINE, "use_karras_sigmas": True},
    "zero-snr": ZERO_SNR,
}
# Karras sigmas of the cosine schedule reach 2e4, where x0 = (x - sigma * eps) / alpha
# with this stand-in model turns a 1-ulp difference of a float32 scalar (torch's sqrt of a
# 0-d tensor is not always correctly rounded) into 1.4e-5 relative on latents of magnitude
# 2000 (5e-6 of the largest): there the tolerance is 1e-5 of the largest magnitude.
HUGE_SIGMA = {"cosine-karras"}
UNIPC_CASES: dict[str, Mapping[str, Any]] = {
    "sd15-linspace": {**SD15, "timestep_spacing": "linspace"},
    "sd15-leading": {**SD15, "timestep_spacing": "leading"},
    "sd15-trailing": {**SD15, "timestep_spacing": "trailing"},
    "sd21-v": SD21V,
    "sdxl": SDXL,
    "sdxl-karras": {**SDXL, "use_karras_sigmas": True},
    "order1": {**SD15, "solver_order": 1},
    "order3": {**SD15, "solver_order": 3},
    "bh1-sigma-min": {**SD15, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    "bh1-order3-sigma-min": {
        **SD15,
        "solver_type": "bh1",
        "solver_order": 3,
        "final_sigmas_type": "sigma_min",
    },
    "noise-prediction": {**SD21V, "predict_x0": False, "solver_order": 3},
    "disable-corrector": {**SD15, "disable_corrector": [0, 2]},
    "karras-sigma-range": {
        **SD15,
        "use_karras_sigmas": True,
        "sigma_min": 0.05,
        "sigma_max": 10.0,
        "final_sigmas_type": "sigma_min",
    },
    "sample-prediction": {**SD15, "prediction_type": "sample"},
    "thresholding": {**SD15, "thresholding": True, "sample_max_value": 3.0},
    "zero-snr": ZERO_SNR,
}
SD3 = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# (config, mu): Flux's mu for 1024x1024 (4096 tokens) is 1.15, for 512x512 0.6375.
FLOW_CASES: dict[str, tuple[Mapping[str, Any], float | None]] = {
    "sd3": (SD3, None),
    "flux-1024": (FLUX, 1.15),
    "flux-512": (FLUX, 0.6375),
    "flux-linear-shift": ({**FLUX, "time_shift_type": "linear"}, 2.5),
    "shift-terminal": ({**SD3, "shift_terminal": 0.1}, None),
    "invert-sigmas": ({**SD3, "invert_sigmas": True}, None),
    "karras": ({**SD3, "use_karras_sigmas": True}, None),
    "exponential": ({**FLUX, "use_exponential_sigmas": True}, 0.9),
    "stochastic": ({**SD3, "stochastic_sampling": True}, None),
}


class TorchNoise:
    """A NoiseSource drawing torch.randn's values from a seeded torch generator."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).numpy()


def model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet/transformer."""
    return (np.float32(0.3) * x + np.float32(0.1 * math.sin(float(t) / 100))).astype(np.float32)


def relative_error(mine: np.ndarray, reference: np.ndarray) -> float:
    """max |mine - reference| / |reference| over elements not near zero."""
    big = np.abs(reference) >= 1e-3
    return float(np.max(np.abs(mine - reference)[big] / np.abs(reference)[big], initial=0.0))


def diffusers_pair(ours: type[Scheduler], config: Mapping[str, Any]) -> tuple[Scheduler, Any]:
    reference_class = getattr(diffusers, ours.diffusers_class)
    return ours(config), reference_class.from_config(dict(config))


def set_both(mine: Scheduler, reference: Any, steps: int, mu: float | None) -> None:
    if mu is None:
        mine.set_timesteps(steps)
        reference.set_timesteps(steps)
    else:
        assert isinstance(mine, FlowMatchEulerDiscrete)
        mine.set_timesteps(steps, mu=mu)
        reference.set_timesteps(steps, mu=mu)


def assert_schedules_match(mine: Scheduler, reference: Any) -> None:
    expected = reference.timesteps.numpy()
    assert mine.timesteps.dtype == expected.dtype
    np.testing.assert_array_equal(mine.timesteps, expected)
    np.testing.assert_allclose(mine.sigmas, reference.sigmas.numpy(), rtol=SIGMA_RTOL)  # type: ignore[attr-defined]


def atol(reference: np.ndarray, scaled: bool, inputs: np.ndarray) -> float:
    """ATOL, or a few float32 ulps of what the step computed from (torch's sqrt, above)."""
    floor = max(ATOL, STEP_ULPS * float(np.abs(inputs).max()))
    return max(floor, RTOL * float(np.abs(reference).max())) if scaled else floor


def denoise_side_by_side(
    mine: Scheduler,
    reference: Any,
    x_mine: np.ndarray,
    begin: int = 0,
    compare: Callable[[int], bool] = lambda index: True,
    scaled_atol: bool = False,
) -> float:
    """Run both from `x_mine` with the same model outputs, comparing every step (where
    `compare` says; after a compared step both continue from the reference's sample). The
    max relative error."""
    x_ref = torch.from_numpy(x_mine.copy())
    noise_mine, noise_ref = TorchNoise(7), TorchNoise(7).generator
    takes_generator = not isinstance(mine, UniPCMultistep)
    # diffusers' flow-matching scheduler has no scale_model_input: the input is the latents.
    scale = getattr(reference, "scale_model_input", lambda x, t: x)
    worst = 0.0
    for index in range(begin, len(mine.timesteps)):
        t_mine, t_ref = mine.timesteps[index], reference.timesteps[index]
        input_mine = mine.scale_model_input(x_mine, t_mine)
        input_ref = np.asarray(scale(x_ref, t_ref))
        np.testing.assert_allclose(
            input_mine, input_ref, rtol=RTOL, atol=atol(input_ref, scaled_atol, x_mine)
        )
        output = model(input_mine, t_mine)
        before = x_mine
        x_mine = mine.step(output, t_mine, x_mine, noise_mine)
        extra = {"generator": noise_ref} if takes_generator else {}
        x_ref = reference.step(torch.from_numpy(output), t_ref, x_ref, **extra).prev_sample
        assert x_mine.dtype == np.float32
        if compare(index):
            expected = x_ref.numpy()
            np.testing.assert_allclose(
                x_mine, expected, rtol=RTOL, atol=atol(expected, scaled_atol, before)
            )
            worst = max(worst, relative_error(x_mine, expected))
            # The next step from the reference's sample: each step's own error is checked,
            # not the float32 noise of the steps before amplified.
            x_mine = expected.copy()
    return worst


def run_side_by_side(
    ours: type[Scheduler],
    config: Mapping[str, Any],
    steps: int,
    mu: float | None = None,
    compare: Callable[[int], bool] = lambda index: True,
    scaled_atol: bool = False,
    begin_index: int | None = None,
) -> float:
    """Build both, compare schedules, denoise from seeded latents; the max relative error."""
    mine, reference = diffusers_pair(ours, config)
    set_both(mine, reference, steps, mu)
    assert_schedules_match(mine, reference)
    if begin_index is not None:
        mine.set_begin_index(begin_index)
        reference.set_begin_index(begin_index)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    # diffusers' flow-matching scheduler has no init_noise_sigma: its pipelines use 1.
    assert mine.init_noise_sigma == getattr(reference, "init_noise_sigma", 1.0)
    x = latents * np.float32(mine.init_noise_sigma)
    return denoise_side_by_side(mine, reference, x, 0, compare, scaled_atol)


@pytest.mark.filterwarnings("ignore:.*algorithm_type dpmsolver is deprecated:FutureWarning")
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("case", list(DPM_CASES))
def test_dpm_solver_matches_diffusers(case: str, steps: int) -> None:
    huge = case in HUGE_SIGMA
    # Its Karras timesteps repeat 998 up to 9 times; found by value, the first step would
    # start at the second (diffusers then fails with IndexError after the last step).
    begin = 0 if huge else None
    run_side_by_side(
        DPMSolverMultistep, DPM_CASES[case], steps, scaled_atol=huge, begin_index=begin
    )


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("case", list(UNIPC_CASES))
def test_unipc_matches_diffusers(case: str, steps: int) -> None:
    run_side_by_side(UniPCMultistep, UNIPC_CASES[case], steps)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("case", list(FLOW_CASES))
def test_flow_match_matches_diffusers(case: str, steps: int) -> None:
    config, mu = FLOW_CASES[case]
    if config.get("shift_terminal") and steps == 1:
        # diffusers' one sigma stretches to 0/0 = NaN (and its step raises IndexError).
        with pytest.raises(InputError, match="shift_terminal needs 2 or more steps"):
            FlowMatchEulerDiscrete(config).set_timesteps(steps)
        return
    run_side_by_side(FlowMatchEulerDiscrete, config, steps, mu)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config", [FLUX, {**FLUX, "use_dynamic_shifting": False, "shift": 1.0}])
def test_flow_match_with_fluxs_sigmas_matches_diffusers(config: dict[str, Any], steps: int) -> None:
    """FluxPipeline's schedule: its own sigmas 1 .. 1/steps (float32), shifted by mu (also
    passed to schnell's scheduler, which does not shift)."""
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mine, reference = diffusers_pair(FlowMatchEulerDiscrete, config)
    assert isinstance(mine, FlowMatchEulerDiscrete)
    mine.set_timesteps(steps, sigmas=sigmas, mu=0.8)
    reference.set_timesteps(steps, sigmas=sigmas, mu=0.8)
    assert_schedules_match(mine, reference)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    denoise_side_by_side(mine, reference, latents)
    with pytest.raises(InputError, match="got 2 sigmas for 3 steps"):
        mine.set_timesteps(3, sigmas=[1.0, 0.5], mu=0.8)


def test_unipc_bh1_reaches_a_zero_final_sigma() -> None:
    """diffusers' UniPC with bh1 returns NaN on its last step to sigma 0 (it multiplies
    B(h) = -inf by an empty correction, 0); ours returns the data prediction there."""
    config = {**SD15, "solver_type": "bh1"}
    run_side_by_side(UniPCMultistep, config, 20, compare=lambda index: index < 19)
    mine = UniPCMultistep(config)
    mine.set_timesteps(4)
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    for t in mine.timesteps:
        x = mine.step(model(x, t), t, x)
    assert np.isfinite(x).all()


IMG2IMG = [
    (DPMSolverMultistep, SDXL, None),
    (DPMSolverMultistep, {**SD15, "use_karras_sigmas": True}, None),
    (UniPCMultistep, SD21V, None),
    (FlowMatchEulerDiscrete, SD3, None),
    (FlowMatchEulerDiscrete, FLUX, 1.15),
]


@pytest.mark.parametrize(("ours", "config", "mu"), IMG2IMG)
def test_image_to_image_noising_and_denoising(
    ours: type[Scheduler], config: Mapping[str, Any], mu: float | None
) -> None:
    """set_begin_index(k), noise to timesteps[k:k+1] (add_noise; scale_noise for flow
    matching), then denoise from step k, as diffusers' img2img pipelines do."""
    steps, begin = 20, 8
    mine, reference = diffusers_pair(ours, config)
    set_both(mine, reference, steps, mu)
    mine.set_begin_index(begin)
    reference.set_begin_index(begin)
    rng = np.random.default_rng(1)
    image, noise = (rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(2))
    t_mine, t_ref = mine.timesteps[begin : begin + 1], reference.timesteps[begin : begin + 1]
    noised = mine.add_noise(image, noise, t_mine)
    if isinstance(mine, FlowMatchEulerDiscrete):
        np.testing.assert_array_equal(mine.scale_noise(image, t_mine, noise), noised)
        expected = reference.scale_noise(torch.from_numpy(image), t_ref, torch.from_numpy(noise))
    else:
        expected = reference.add_noise(torch.from_numpy(image), torch.from_numpy(noise), t_ref)
    np.testing.assert_allclose(noised, expected.numpy(), rtol=RTOL, atol=ATOL)
    denoise_side_by_side(mine, reference, noised, begin)


@pytest.mark.parametrize(("ours", "config", "mu"), IMG2IMG)
def test_add_noise_by_timestep_value(
    ours: type[Scheduler], config: Mapping[str, Any], mu: float | None
) -> None:
    """Without a begin index each batch item is noised to its own timestep, found by value."""
    mine, reference = diffusers_pair(ours, config)
    set_both(mine, reference, 10, mu)
    rng = np.random.default_rng(2)
    image, noise = (rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(2))
    picks = [2, 7]
    noised = mine.add_noise(image, noise, mine.timesteps[picks])
    image_t, noise_t, t_ref = torch.from_numpy(image), torch.from_numpy(noise), reference.timesteps
    if isinstance(mine, FlowMatchEulerDiscrete):
        expected = reference.scale_noise(image_t, t_ref[picks], noise_t)
    else:
        expected = reference.add_noise(image_t, noise_t, t_ref[picks])
    np.testing.assert_allclose(noised, expected.numpy(), rtol=RTOL, atol=ATOL)


UNSUPPORTED = [
    (DPMSolverMultistep, {"algorithm_type": "sde-dpmsolver"}, "algorithm_type='sde-dpmsolver'"),
    (DPMSolverMultistep, {"algorithm_type": "dpmsolver"}, "final_sigmas_type='zero'"),
    (DPMSolverMultistep, {"use_lu_lambdas": True}, "use_lu_lambdas=True"),
    (DPMSolverMultistep, {"solver_order": 4}, "solver_order=4"),
    (DPMSolverMultistep, {"variance_type": "learned_range"}, "variance_type='learned_range'"),
    (DPMSolverMultistep, {"prediction_type": "flow_prediction"}, "prediction_type"),
    (DPMSolverMultistep, {"timestep_spacing": "uniform"}, "timestep_spacing='uniform'"),
    (UniPCMultistep, {"lower_order_final": False}, "lower_order_final=False"),
    (UniPCMultistep, {"use_flow_sigmas": True}, "use_flow_sigmas=True"),
    (UniPCMultistep, {"solver_type": "bh3"}, "solver_type='bh3'"),
    (FlowMatchEulerDiscrete, {"use_beta_sigmas": True}, "use_beta_sigmas=True"),
    (FlowMatchEulerDiscrete, {"time_shift_type": "cubic"}, "time_shift_type='cubic'"),
]


@pytest.mark.parametrize(("ours", "config", "names"), UNSUPPORTED)
def test_unsupported_config_is_refused(
    ours: type[Scheduler], config: Mapping[str, Any], names: str
) -> None:
    with pytest.raises(UnsupportedError, match=f"^{ours.diffusers_class}: .*supported") as caught:
        ours({**SD15, **config})
    message = str(caught.value)
    assert names in message and "\n" not in message


def test_flux_needs_mu() -> None:
    with pytest.raises(InputError, match="needs mu"):
        FlowMatchEulerDiscrete(FLUX).set_timesteps(4)


def test_importing_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import modelkiln.diffusion.schedulers.dpm_solver, modelkiln.diffusion.schedulers.unipc\n"
        "import modelkiln.diffusion.schedulers.flow_match\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
