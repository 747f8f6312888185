"""The Euler, Euler ancestral, LMS, DDIM, PNDM and LCM schedulers against diffusers' own.

Each case builds diffusers' class and ours from one config dict, compares the schedules, then
runs both loops side by side: the same initial latents, the same model output at each step
(computed from our scaled input, so only the step arithmetic is compared), the same noise
(our NoiseSource wraps a torch.Generator seeded as diffusers' is), each loop continuing from
its own previous sample.

torch's CPU float32 sqrt (MKL's, on x86) is not correctly rounded: about 0.6% of its results
are 1 ulp low. Ours is, so sigma tables agree to 1 ulp rather than bit for bit, and so do
timesteps derived from them (Karras, exponential, continuous).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from tolerances import SIGMA_RTOL, STEP_ULPS

from modelkiln.diffusion.schedulers.base import Scheduler
from modelkiln.diffusion.schedulers.ddim import DDIM
from modelkiln.diffusion.schedulers.euler import EulerAncestralDiscrete, EulerDiscrete
from modelkiln.diffusion.schedulers.lcm import LCM
from modelkiln.diffusion.schedulers.lms import LMSDiscrete, lms_coefficient
from modelkiln.diffusion.schedulers.pndm import PNDM
from modelkiln.errors import InputError, UnsupportedError

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# runwayml/stable-diffusion-v1-5's scheduler_config.json (PNDMScheduler)
SD15: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# stabilityai/stable-diffusion-2-1's: v-prediction
SD21_V = {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "leading"}
# stabilityai/stable-diffusion-xl-base-1.0's (EulerDiscreteScheduler)
SDXL = {
    **SD15,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
# SimianLuo/LCM_Dreamshaper_v7's (LCMScheduler)
LCM_SD15 = {
    **SD15,
    "original_inference_steps": 50,
    "set_alpha_to_one": True,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
}

COMMON = {
    "sd15": SD15,
    "sd21-v-leading": SD21_V,
    "sd21-v-trailing": {**SD21_V, "timestep_spacing": "trailing"},
    "sdxl": SDXL,
    "linspace": {**SD15, "timestep_spacing": "linspace"},
    "trailing": {**SD15, "timestep_spacing": "trailing"},
}
ZERO_SNR_V = {**SD21_V, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
COSINE = {"beta_schedule": "squaredcos_cap_v2"}
EXTRA: dict[type[Scheduler], dict[str, dict[str, Any]]] = {
    EulerDiscrete: {
        "karras": {**SDXL, "use_karras_sigmas": True},
        "karras-v": {**SD21_V, "use_karras_sigmas": True, "timestep_spacing": "trailing"},
        "exponential": {**SD15, "use_exponential_sigmas": True},
        "log-linear": {**SD15, "interpolation_type": "log_linear"},
        "continuous-v": {**SD21_V, "timestep_type": "continuous"},
        "zero-snr-v": ZERO_SNR_V,
        "sigma-min": {**SD15, "final_sigmas_type": "sigma_min"},
        "sample": {**SD15, "prediction_type": "sample"},
        "cosine-defaults": COSINE,
    },
    EulerAncestralDiscrete: {"zero-snr-v": ZERO_SNR_V, "defaults": {}},
    LMSDiscrete: {
        "karras": {**SDXL, "use_karras_sigmas": True},
        "exponential": {**SD15, "use_exponential_sigmas": True},
        "sample": {**SD15, "prediction_type": "sample"},
        "cosine-defaults": COSINE,
    },
    DDIM: {
        "clip": {**SD15, "clip_sample": True, "clip_sample_range": 0.8},
        "alpha-to-one": {**SD15, "set_alpha_to_one": True},
        "sample-clip": {**SD15, "prediction_type": "sample", "clip_sample": True},
        "thresholding": {**SD15, "thresholding": True, "sample_max_value": 1.5},
        "zero-snr-v": ZERO_SNR_V,
        "cosine-defaults": COSINE,
    },
    PNDM: {
        "prk": {**SD15, "skip_prk_steps": False},
        "prk-v-trailing": {**SD21_V, "skip_prk_steps": False, "timestep_spacing": "trailing"},
        "prk-linspace": {**SD15, "skip_prk_steps": False, "timestep_spacing": "linspace"},
    },
}
STEPS = (1, 2, 4, 25, 50)


class TorchNoise:
    """A NoiseSource drawing torch.randn's values from a seeded torch.Generator."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        return torch.randn(shape, generator=self.generator).numpy()


def _cases() -> list[Any]:
    cases = []
    lcm = {
        "lcm-sd15": LCM_SD15,
        "v": {**LCM_SD15, "prediction_type": "v_prediction"},
        "sample-clip": {**LCM_SD15, "prediction_type": "sample", "clip_sample": True},
        "original-100": {**LCM_SD15, "original_inference_steps": 100, "set_alpha_to_one": False},
        "zero-snr-v": {
            **LCM_SD15,
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
        },
    }
    schedulers: list[tuple[type[Scheduler], dict[str, Any]]] = [
        (cls, {**COMMON, **EXTRA.get(cls, {})})
        for cls in (EulerDiscrete, EulerAncestralDiscrete, LMSDiscrete, DDIM, PNDM)
    ]
    schedulers.append((LCM, lcm))
    for cls, configs in schedulers:
        for label, config in configs.items():
            for steps in STEPS:
                if label.startswith("prk") and steps < 4:
                    continue  # diffusers' prk schedule needs 4 steps
                cases.append(pytest.param(cls, config, steps, {}, id=f"{cls.name}-{label}-{steps}"))
    for label, config in (("sd15", SD15), ("sd21-v-trailing", COMMON["sd21-v-trailing"])):
        for steps in STEPS:
            param = pytest.param(DDIM, config, steps, {"eta": 0.7}, id=f"ddim-eta-{label}-{steps}")
            cases.append(param)
    return cases


def _reference(cls: type[Scheduler], config: Mapping[str, Any]) -> Any:
    return getattr(diffusers, cls.diffusers_class).from_config(dict(config))


def _model_output(scaled: np.ndarray, timestep: Any) -> np.ndarray:
    return (0.3 * scaled + 0.1 * np.sin(float(timestep) / 100)).astype(np.float32)


def _check_schedule(ref: Any, ours: Scheduler, config: Mapping[str, Any]) -> None:
    expected = ref.timesteps.numpy()
    assert ours.timesteps.dtype == expected.dtype
    # timesteps computed from sigmas are off by as much as a sigma is
    karras = config.get("use_karras_sigmas") or config.get("use_exponential_sigmas")
    if karras or config.get("timestep_type") == "continuous":
        np.testing.assert_allclose(ours.timesteps, expected, rtol=1e-6)
    else:
        np.testing.assert_array_equal(ours.timesteps, expected)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=2.5e-7)
    if hasattr(ref, "sigmas"):
        assert ours.sigmas.dtype == np.float32  # type: ignore[attr-defined]
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=SIGMA_RTOL)  # type: ignore[attr-defined]


def _assert_close(
    actual: np.ndarray,
    expected: np.ndarray,
    message: str,
    *,
    inputs: np.ndarray,
    cancels: bool = False,
) -> None:
    """Within rtol 1e-5, and atol 1e-6 or a few float32 ulps of the step's `inputs`, whichever
    is larger: torch's 1-ulp-off sqrt moves a result by ulps of what it was computed from
    (zero-SNR's first step starts from |x| ~ 4096·4, where an ulp is 5e-4). Where a step
    `cancels` (Euler ancestral's x + d*dt ~ 0 with |x| ~ 10, its dt from sqrt(to^2 - up^2)),
    the same error is ~1e-7 of the operands: atol there is 1e-6 of the array's scale."""
    scale = max(1.0, float(np.abs(expected).max())) if cancels else 1.0
    atol = max(1e-6 * scale, STEP_ULPS * float(np.abs(inputs).max()))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=atol, err_msg=message)


def _run_side_by_side(
    ref: Any, ours: Scheduler, latents: np.ndarray, start: int, step_kwargs: Mapping[str, Any]
) -> None:
    reference = torch.from_numpy(latents.copy())
    sample = latents.copy()
    generator, noise = torch.Generator().manual_seed(7), TorchNoise(7)
    accepts_generator = "generator" in ref.step.__code__.co_varnames
    extra = {"generator": generator} if accepts_generator else {}
    pairs = zip(ref.timesteps[start:], ours.timesteps[start:], strict=True)
    cancels = isinstance(ours, EulerAncestralDiscrete)
    for i, (ref_t, t) in enumerate(pairs):
        scaled = ours.scale_model_input(sample, t)
        expected = ref.scale_model_input(reference, ref_t).numpy()
        _assert_close(scaled, expected, f"input {i}", inputs=sample, cancels=cancels)
        output = _model_output(scaled, t)
        reference = ref.step(torch.from_numpy(output), ref_t, reference, **extra, **step_kwargs)
        reference = reference.prev_sample
        before = sample
        sample = ours.step(output, t, sample, noise, **step_kwargs)
        assert sample.dtype == np.float32
        message = f"step {i} (t={t})"
        _assert_close(sample, reference.numpy(), message, inputs=before, cancels=cancels)
        # Each step from the reference's sample: a step's own error is checked, not the
        # float32 noise of the steps before amplified (zero-SNR's first step keeps ~3 digits).
        sample = reference.numpy().copy()


@pytest.mark.parametrize(("cls", "config", "steps", "step_kwargs"), _cases())
def test_matches_diffusers(
    cls: type[Scheduler], config: dict[str, Any], steps: int, step_kwargs: dict[str, Any]
) -> None:
    ref, ours = _reference(cls, config), cls(config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    _check_schedule(ref, ours, config)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    latents = latents * np.float32(ours.init_noise_sigma)
    _run_side_by_side(ref, ours, latents, 0, step_kwargs)


ALL = (EulerDiscrete, EulerAncestralDiscrete, LMSDiscrete, DDIM, PNDM, LCM)


@pytest.mark.parametrize("cls", ALL, ids=lambda cls: cls.name)
@pytest.mark.parametrize("config", [SD15, COMMON["sd21-v-trailing"]], ids=["sd15", "sd21-v"])
def test_image_to_image(cls: type[Scheduler], config: dict[str, Any]) -> None:
    """add_noise at timesteps[k] after set_begin_index(k), then the loop from there."""
    steps, begin = 25, 10
    ref, ours = _reference(cls, config), cls(config)
    if cls is LCM:
        ref.set_timesteps(4, strength=0.6)
        ours.set_timesteps(4, strength=0.6)  # type: ignore[call-arg]
        begin = 1
    else:
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
    _check_schedule(ref, ours, config)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)
    ours.set_begin_index(begin)
    rng = np.random.default_rng(1)
    image = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    noise = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    expected = ref.add_noise(
        torch.from_numpy(image), torch.from_numpy(noise), ref.timesteps[begin : begin + 1]
    ).numpy()
    noisy = ours.add_noise(image, noise, ours.timesteps[begin : begin + 1])
    np.testing.assert_allclose(noisy, expected, rtol=1e-6, atol=1e-6)
    _run_side_by_side(ref, ours, noisy, begin, {})


@pytest.mark.parametrize("cls", ALL, ids=lambda cls: cls.name)
def test_add_noise_per_item_timesteps(cls: type[Scheduler]) -> None:
    """Without a begin index: one timestep per batch item, looked up in the schedule."""
    ref, ours = _reference(cls, SD15), cls(SD15)
    ref.set_timesteps(4)
    ours.set_timesteps(4)
    rng = np.random.default_rng(2)
    image = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    noise = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    picks = [0, 2]
    expected = ref.add_noise(
        torch.from_numpy(image), torch.from_numpy(noise), ref.timesteps[picks]
    ).numpy()
    noisy = ours.add_noise(image, noise, ours.timesteps[picks])
    np.testing.assert_allclose(noisy, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (EulerDiscrete, "use_beta_sigmas", True),
        (EulerDiscrete, "timestep_spacing", "uniform"),
        (EulerDiscrete, "interpolation_type", "cubic"),
        (EulerDiscrete, "final_sigmas_type", "max"),
        (EulerAncestralDiscrete, "prediction_type", "sample"),
        (LMSDiscrete, "use_beta_sigmas", True),
        (DDIM, "prediction_type", "flow"),
        (PNDM, "prediction_type", "sample"),
        (LCM, "prediction_type", "x0"),
        (DDIM, "beta_schedule", "sigmoid"),
    ],
)
def test_unsupported_value_is_refused(cls: type[Scheduler], key: str, value: Any) -> None:
    with pytest.raises(UnsupportedError, match=rf"{key}\W+{value}\W.*supported"):
        cls({**SD15, key: value})


def test_too_few_steps_for_prk_is_refused() -> None:
    with pytest.raises(InputError, match="at least 4 steps"):
        PNDM({**SD15, "skip_prk_steps": False}).set_timesteps(3)


def test_unknown_keys_are_ignored() -> None:
    scheduler = EulerDiscrete({**SDXL, "_class_name": "EulerDiscreteScheduler", "foo": 1})
    assert "foo" not in scheduler.config
    assert scheduler.config["timestep_spacing"] == "leading"


def test_noise_without_generator_comes_from_numpy() -> None:
    scheduler = EulerAncestralDiscrete(SD15)
    scheduler.set_timesteps(2)
    sample = np.ones((1, 4, 8, 8), dtype=np.float32)
    t = scheduler.timesteps[0]
    out = scheduler.step(scheduler.scale_model_input(sample, t), t, sample)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


def test_lms_coefficients_equal_quad() -> None:
    """Exact polynomial integration against scipy's quad on a float64 integrand."""
    integrate = pytest.importorskip("scipy.integrate")
    scheduler = LMSDiscrete(SD15)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.astype(np.float64)
    index, order = 5, 4
    for current in range(order):

        def basis(tau: float, current: int = current) -> float:
            value = 1.0
            for k in range(order):
                if k != current:
                    value *= (tau - sigmas[index - k]) / (
                        sigmas[index - current] - sigmas[index - k]
                    )
            return value

        expected = integrate.quad(basis, sigmas[index], sigmas[index + 1], epsrel=1e-12)[0]
        assert lms_coefficient(sigmas, order, index, current) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("module", ["euler", "lms", "ddim", "pndm", "lcm"])
def test_import_does_not_need_torch(module: str) -> None:
    code = (
        "import sys\n"
        f"import modelkiln.diffusion.schedulers.{module}\n"
        "heavy = [m for m in ('torch', 'diffusers', 'scipy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
