"""ControlNet (SD 1.x and SDXL): the ControlNet exported beside a UNet that takes its
residuals, run by the torch-free pipeline, against diffusers' StableDiffusion(XL)ControlNet
pipelines."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusion_checks import PROMPT, SIZE, STEPS, psnr
from PIL import Image

from modelkiln import build, load, open_artifact
from modelkiln.errors import InputError, UnsupportedError

# OpenVINO runs the same ONNX export (sd-openvino-fp32 converts it): checked once by hand
# (83 dB against diffusers), not on every run, to keep the suite short.
ROUND_TRIPS = [
    pytest.param(
        "sd-controlnet", "sd-onnxruntime-fp32", marks=pytest.mark.onnxruntime, id="sd-onnx-ort"
    ),
    pytest.param(
        "sdxl-controlnet",
        "sdxl-onnxruntime-fp32",
        marks=pytest.mark.onnxruntime,
        id="sdxl-onnx-ort",
    ),
]


def control_image(seed: int = 3) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def diffusers_pipelines(source: Path) -> tuple[Any, Any]:
    """diffusers' ControlNet pipeline on the source, and its plain pipeline (no ControlNet)."""
    import diffusers

    index = json.loads((source / "model_index.json").read_text())
    prefix = "StableDiffusionXL" if "XL" in index["_class_name"] else "StableDiffusion"
    controlled = getattr(diffusers, prefix + "ControlNetPipeline").from_pretrained(source)
    components = {k: v for k, v in controlled.components.items() if k != "controlnet"}
    plain = getattr(diffusers, prefix + "Pipeline")(**components)
    for pipeline in (controlled, plain):
        pipeline.set_progress_bar_config(disable=True)
    return controlled, plain


def diffusers_call(**arguments: Any) -> dict[str, Any]:
    import torch

    return {
        "num_inference_steps": STEPS,
        "generator": torch.Generator().manual_seed(0),
        "height": SIZE,
        "width": SIZE,
        **arguments,
    }


@pytest.mark.parametrize(("fixture", "profile"), ROUND_TRIPS)
def test_controlnet_generation_matches_diffusers_controlnet_pipeline(
    fixture: str, profile: str, built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    source = source_dir(fixture)
    artifact = built(fixture, profile)
    manifest = open_artifact(artifact).manifest
    encoders = (
        ["text_encoder", "text_encoder_2"] if fixture.startswith("sdxl") else ["text_encoder"]
    )
    assert list(manifest.components) == [
        *encoders,
        "controlnet",
        "unet",
        "vae_encoder",
        "vae_decoder",
    ]
    residuals = [n for n in manifest.components["unet"].inputs if "residual" in n]
    assert len(residuals) == 5  # conv_in, 1 layer + downsampler, 1 layer; the mid block
    reference, base = diffusers_pipelines(source)
    pipeline = load(artifact)
    images = {}
    for scale in (1.0, 0.5):
        (ours,) = images[scale] = pipeline.text_to_image(
            PROMPT, control_image=control_image(), control_scale=scale, steps=STEPS, seed=0
        )
        theirs = reference(
            PROMPT,
            image=control_image(),
            **diffusers_call(controlnet_conditioning_scale=scale),
        ).images[0]
        assert psnr(ours, theirs) >= 35, scale
    # No control image: the plain UNet, as diffusers' pipeline without the ControlNet.
    (plain,) = pipeline.text_to_image(PROMPT, steps=STEPS, seed=0)
    assert psnr(plain, base(PROMPT, **diffusers_call()).images[0]) >= 35
    # The ControlNet changes the image, the more the higher its scale.
    assert psnr(plain, images[1.0][0]) < psnr(plain, images[0.5][0]) < 45


def test_several_controlnets_sum_their_scaled_residuals_as_diffusers_multicontrolnet(
    built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    source = source_dir("sd-multicontrolnet")
    artifact = built("sd-multicontrolnet", "sd-onnxruntime-fp32")
    components = list(open_artifact(artifact).manifest.components)
    assert components[1:3] == ["controlnet", "controlnet_1"]
    reference, _ = diffusers_pipelines(source)
    images, scales = [control_image(3), control_image(4)], [1.0, 0.5]
    pipeline = load(artifact)
    (ours,) = pipeline.text_to_image(
        PROMPT, control_image=images, control_scale=scales, steps=STEPS, seed=0
    )
    call = diffusers_call(controlnet_conditioning_scale=scales)
    theirs = reference(PROMPT, image=images, **call).images[0]
    assert psnr(ours, theirs) >= 35
    # The second ControlNet matters: diffusers' first net alone makes another image.
    first = diffusers_call(controlnet_conditioning_scale=[1.0, 0.0])
    assert psnr(ours, reference(PROMPT, image=images, **first).images[0]) < 45
    with pytest.raises(InputError, match="has 2 ControlNets and got 1 control image"):
        pipeline.text_to_image(PROMPT, control_image=images[0], steps=1)
    with pytest.raises(InputError, match="got 3 control scales for 2 control images"):
        pipeline.text_to_image(PROMPT, control_image=images, control_scale=[1, 1, 1], steps=1)


def test_controlnet_mistakes_are_clear(
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
    tmp_path: Path,
    kiln_main: Callable[..., Any],
) -> None:
    control = tmp_path / "edges.png"
    control_image().save(control)
    plain = built("sd", "sd-onnxruntime-fp32")
    controlled = built("sd-controlnet", "sd-onnxruntime-fp32")
    with pytest.raises(InputError, match="this artifact has no ControlNet"):
        load(plain).text_to_image(PROMPT, control_image=control, steps=1)
    with pytest.raises(InputError, match=r"control_scale must be in 0\.\.10\.0"):
        load(controlled).text_to_image(PROMPT, control_image=control, control_scale=-1, steps=1)
    with pytest.raises(UnsupportedError, match=r"set shapes\.dynamic_resolution = false"):
        build(
            source_dir("sd-controlnet"),
            "sd-onnxruntime-fp32",
            tmp_path / "art",
            overrides=["shapes.dynamic_resolution=true"],
        )
    assert not (tmp_path / "art").exists()
    outcome = kiln_main(
        "generate", plain, "--prompt", PROMPT, "--control-scale", "0.5", "-o", tmp_path / "x.png"
    )
    assert outcome.code != 0 and "--control-scale applies to --control-image" in outcome.err
    out = tmp_path / "controlled.png"
    outcome = kiln_main(
        "generate",
        controlled,
        "--prompt",
        PROMPT,
        "--steps",
        "2",
        "--control-image",
        control,
        "--control-scale",
        "0.8",
        "-o",
        out,
    )
    assert outcome.code == 0, outcome.err
    assert Image.open(out).size == (SIZE, SIZE)
