"""TaylorSeer Lite (`[generation] taylorseer_interval`, `kiln generate --taylorseer-interval`)
in the pipelines: the denoiser runs on the steps the schedule computes only, whatever the
family (UNet or transformer) and the backend; 1 is the exact pipeline; the build gates its
cost end to end; what does not combine is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_support import invoke
from diffusion_checks import PROMPT, SIZE, generate, psnr
from PIL import Image

from modelkiln import load, open_artifact
from modelkiln.errors import InputError, ProfileError
from modelkiln.models import FAMILIES

pytestmark = [pytest.mark.torch, pytest.mark.slow]

STEPS = 10
# Steps 0, 1 (warm-up), 4, 7 (one in 3 after it) and 9 (cool-down) compute.
FORECAST = {"taylorseer_interval": 3, "taylorseer_warmup": 2, "taylorseer_cooldown": 1}
COMPUTED = 5
AT_SIZE = (f"shapes.height={SIZE}", f"shapes.width={SIZE}")


def _denoiser_batches(pipeline: Any, denoiser: str, **settings: Any) -> tuple[Any, list[int]]:
    """An image, and the batch of each call of the denoiser that made it."""
    from modelkiln.reference import RecordingSession

    recorder = RecordingSession(pipeline.sessions[denoiser])
    pipeline.sessions[denoiser] = recorder
    try:
        # Euler: one UNet call per step (the source's PNDM makes 11 of 10 steps).
        scheduler = {"scheduler": "euler"} if denoiser == "unet" else {}
        image = generate(pipeline, "text", steps=STEPS, **scheduler, **settings)
    finally:
        pipeline.sessions[denoiser] = recorder.inner
    sample = "sample" if denoiser == "unet" else "hidden_states"
    return image, [len(feeds[sample]) for feeds in recorder.feeds]


def test_the_unet_runs_on_the_computed_steps_only(built: Callable[..., Path]) -> None:
    with load(built("sd", "sd-torch-fp32")) as pipeline:
        exact, every = _denoiser_batches(pipeline, "unet")
        forecast, computed = _denoiser_batches(pipeline, "unet", **FORECAST)
        same, _ = _denoiser_batches(pipeline, "unet", taylorseer_interval=1)
        # Guidance ends after step 4 (of 10): steps 5 and 6 compute on the prompt's half
        # before its outputs can be forecast; split guidance forecasts each half on its own.
        _, ended = _denoiser_batches(pipeline, "unet", guidance_end=0.5, **FORECAST)
        _, split = _denoiser_batches(pipeline, "unet", split_guidance=True, **FORECAST)
    assert every == [2] * STEPS
    assert computed == [2] * COMPUTED
    assert ended == [2, 2, 2, 1, 1, 1, 1]  # steps 0, 1, 4 guided; 5, 6, 7, 9 not
    assert split == [1] * (2 * COMPUTED)
    assert same == exact
    assert 20 <= psnr(forecast, exact) < 80  # an approximation, a close one


BACKENDS = [
    pytest.param("sd-onnxruntime-fp32", marks=pytest.mark.onnxruntime, id="onnx-ort"),
    pytest.param("sd-openvino-fp32", marks=pytest.mark.openvino, id="ir-ov"),
]


@pytest.mark.parametrize("profile", BACKENDS)
def test_every_backend_forecasts_the_same_image(profile: str, built: Callable[..., Path]) -> None:
    with load(built("sd", "sd-torch-fp32")) as torch_pipeline:
        expected, _ = _denoiser_batches(torch_pipeline, "unet", **FORECAST)
    with load(built("sd", profile)) as pipeline:
        image, computed = _denoiser_batches(pipeline, "unet", **FORECAST)
    assert computed == [2] * COMPUTED
    assert psnr(image, expected) >= 35


@pytest.mark.parametrize(
    ("source", "profile", "overrides", "batch"),
    [
        # guidance embedded: one call of the prompt
        ("flux-dev", "flux-torch-fp32", AT_SIZE, 1),
        # classifier-free guidance in one batch of 2
        ("sd3", "sd3-torch-fp32", (), 2),
    ],
)
def test_a_transformer_runs_on_the_computed_steps_only(
    source: str,
    profile: str,
    overrides: tuple[str, ...],
    batch: int,
    built: Callable[..., Path],
) -> None:
    with load(built(source, profile, *overrides)) as pipeline:
        exact, every = _denoiser_batches(pipeline, "transformer")
        forecast, computed = _denoiser_batches(pipeline, "transformer", **FORECAST)
    assert every == [batch] * STEPS
    assert computed == [batch] * COMPUTED
    assert 20 <= psnr(forecast, exact) < 80


def test_build_gates_the_forecast_against_the_exact_reference(
    built: Callable[..., Path], source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from modelkiln import build
    from modelkiln.errors import ValidationError

    # A second-order forecast: the order travels with the rest.
    forecast = FORECAST | {"taylorseer_order": 2}
    chosen = [f"generation.{key}={value}" for key, value in forecast.items()]
    gate = ['validation.prompts=["a red fox in a forest"]', f"validation.steps={STEPS}"]
    artifact = built("sd", "sd-torch-fp32", *chosen, *gate, "validation.min_psnr_db=20")
    manifest = open_artifact(artifact).manifest
    assert manifest.model_info["approximations"] == forecast
    # A bundle's README tells an app which steps to compute and how to forecast the others.
    notes = FAMILIES.get("sd").app_notes(manifest, [])
    assert (
        "TaylorSeer (validated so): after the first 2 steps run `unet` on the last of each 3"
        in notes
    )
    assert "the last output plus d1 × s + d2 × s^2 / 2, where" in notes
    assert manifest.end_to_end is not None
    (measured,) = manifest.end_to_end.psnr_db
    assert measured is not None and 20 <= measured < 80
    with load(artifact) as pipeline:  # the build's schedule is the call's default
        _, computed = _denoiser_batches(pipeline, "unet")
        _, every = _denoiser_batches(pipeline, "unet", taylorseer_interval=1)
    assert (len(computed), len(every)) == (COMPUTED, STEPS)
    with pytest.raises(ValidationError, match=r"lower generation\.taylorseer_interval"):
        build(
            source_dir("sd"),
            "sd-torch-fp32",
            tmp_path / "strict",
            overrides=[*chosen, *gate, "validation.min_psnr_db=99"],
        )
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["generation.taylorseer_interval=0"], r"taylorseer_interval must be in 1\.\.1000"),
        (["generation.taylorseer_warmup=-1"], r"taylorseer_warmup must be in 0\.\.1000"),
        (["generation.taylorseer_order=4"], r"taylorseer_order must be in 1\.\.3"),
        (
            ["generation.taylorseer_interval=3", "model.deep_cache=3"],
            "keep one step cache",
        ),
    ],
)
def test_profiles_refuse_what_cannot_run(
    overrides: list[str], message: str, source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from modelkiln import build

    with pytest.raises(ProfileError, match=message):
        build(source_dir("sd"), "sd-torch-fp32", tmp_path / "out", overrides=overrides)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"taylorseer_interval": 0}, r"taylorseer_interval must be in 1\.\.1000 \(1: the"),
        ({"taylorseer_interval": 2.5}, "taylorseer_interval must be a whole number"),
        ({"taylorseer_warmup": True}, "taylorseer_warmup must be a whole number"),
        ({"taylorseer_cooldown": -1}, r"taylorseer_cooldown must be in 0\.\.1000"),
        ({"taylorseer_order": 0}, r"taylorseer_order must be in 1\.\.3 \(the forecast's"),
        ({"taylorseer_interval": 3, "cache_threshold": 0.2}, "use one step cache"),
    ],
)
def test_calls_refuse_what_cannot_run(
    settings: dict[str, Any], message: str, built: Callable[..., Path]
) -> None:
    with (
        load(built("flux-dev", "flux-torch-fp32", *AT_SIZE)) as pipeline,
        pytest.raises(InputError, match=message),
    ):
        pipeline.text_to_image(PROMPT, steps=2, **settings)


def test_kiln_generate_taylorseer(built: Callable[..., Path], tmp_path: Path) -> None:
    artifact = built("sd", "sd-torch-fp32")
    images = {}
    for interval in ("1", "3"):
        out = tmp_path / f"every-{interval}.png"
        args = ["generate", str(artifact), "--prompt", PROMPT, "--steps", str(STEPS)]
        forecast = ["--taylorseer-interval", interval, "--taylorseer-warmup", "2"]
        forecast += ["--taylorseer-order", "2"]
        result = invoke(*args, *forecast, "--taylorseer-cooldown", "1", "-o", out)
        assert result.exit_code == 0, result.output
        images[interval] = Image.open(out).convert("RGB")
    assert 20 <= psnr(images["1"], images["3"]) < 80
    refused = invoke(
        "generate",
        artifact,
        "--prompt",
        PROMPT,
        "--taylorseer-interval",
        "0",
        "-o",
        tmp_path / "x.png",
    )
    assert refused.exit_code == 2
    assert "--taylorseer-interval" in refused.output
