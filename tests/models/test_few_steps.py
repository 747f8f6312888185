"""[generation]: a build's scheduler, steps and guidance, for few-step models (LCM, Turbo):
written into the artifact's scheduler config and used where a call leaves them out."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from diffusion_checks import PROMPT, SIZE, diffusers_reference, psnr

from modelkiln import load, open_artifact
from modelkiln.errors import ProfileError, UnsupportedError
from modelkiln.plan import load_profile

LCM = ("generation.scheduler=lcm", "generation.steps=4", "generation.guidance=1.0")


def test_an_lcm_build_generates_in_four_steps_as_diffusers_lcm_does(
    built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    artifact = built("sd", "sd-onnxruntime-fp32", *LCM)
    scheduler = json.loads((artifact / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler"
    source = json.loads((source_dir("sd") / "scheduler" / "scheduler_config.json").read_text())
    # The source's own values are kept (as diffusers' from_config does).
    assert {k: scheduler[k] for k in ("beta_start", "beta_end", "beta_schedule")} == {
        k: source[k] for k in ("beta_start", "beta_end", "beta_schedule")
    }
    assert open_artifact(artifact).manifest.model_info["generation"] == {
        "steps": 4,
        "guidance": 1.0,
    }

    pipeline = load(artifact)
    calls = []
    unet = pipeline.sessions["unet"]
    original = unet.run
    unet.run = lambda feeds, *a, **k: calls.append(1) or original(feeds, *a, **k)  # type: ignore[method-assign]
    (ours,) = pipeline.text_to_image(PROMPT, seed=0, height=SIZE, width=SIZE)  # no steps given
    assert len(calls) == 4
    expected = diffusers_reference(
        source_dir("sd"), "text", "lcm", num_inference_steps=4, guidance_scale=1.0
    )
    assert psnr(ours, expected) >= 40
    # A call's own settings still win.
    calls.clear()
    pipeline.text_to_image(PROMPT, seed=0, steps=2, height=SIZE, width=SIZE)
    assert len(calls) == 2


def test_generation_settings_are_checked_against_the_family() -> None:
    profile = load_profile("sd-lcm-openvino-int8")
    assert (profile.generation.scheduler, profile.generation.steps) == ("lcm", 4)
    assert load_profile("sdxl-turbo-openvino-bf16").generation.guidance == 0.0
    with pytest.raises(UnsupportedError, match=r"\[generation\] does not apply to vit models"):
        load_profile("vit-onnxruntime-fp32", ["generation.steps=4"])
    with pytest.raises(
        UnsupportedError,
        match=r"generation.scheduler = 'lcm' does not run sd3 models.*use one of: flow-match-euler",
    ):
        load_profile("sd3-onnxruntime-fp32", ["generation.scheduler=lcm"])
    with pytest.raises(UnsupportedError, match=r"'eular'.*did you mean 'euler'"):
        load_profile("sd-onnxruntime-fp32", ["generation.scheduler=eular"])
    with pytest.raises(ProfileError, match=r"generation.steps must be in 1..1000, got 0"):
        load_profile("sd-onnxruntime-fp32", ["generation.steps=0"])
    with pytest.raises(ProfileError, match=r"generation.guidance must be in 0.0..100.0"):
        load_profile("sd-onnxruntime-fp32", ["generation.guidance=-1"])
