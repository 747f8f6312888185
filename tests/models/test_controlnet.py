"""ControlNet (SD 1.x): the ControlNet exported beside a UNet that takes its residuals, run
by the torch-free pipeline, against diffusers' StableDiffusionControlNetPipeline."""

from __future__ import annotations

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
    pytest.param("sd-onnxruntime-fp32", marks=pytest.mark.onnxruntime, id="onnx-ort"),
]


def control_image() -> Image.Image:
    pixels = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def diffusers_controlnet(source: Path) -> Any:
    from diffusers import StableDiffusionControlNetPipeline

    pipeline = StableDiffusionControlNetPipeline.from_pretrained(source)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def diffusers_call(**arguments: Any) -> dict[str, Any]:
    import torch

    return {
        "num_inference_steps": STEPS,
        "generator": torch.Generator().manual_seed(0),
        "height": SIZE,
        "width": SIZE,
        **arguments,
    }


@pytest.mark.parametrize("profile", ROUND_TRIPS)
def test_controlnet_generation_matches_diffusers_controlnet_pipeline(
    profile: str, built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    from diffusers import StableDiffusionPipeline

    source = source_dir("sd-controlnet")
    artifact = built("sd-controlnet", profile)
    manifest = open_artifact(artifact).manifest
    assert list(manifest.components) == [
        "text_encoder",
        "controlnet",
        "unet",
        "vae_encoder",
        "vae_decoder",
    ]
    residuals = [n for n in manifest.components["unet"].inputs if "residual" in n]
    assert len(residuals) == 5  # conv_in, 1 layer + downsampler, 1 layer; the mid block
    reference = diffusers_controlnet(source)
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
    components = {k: v for k, v in reference.components.items() if k != "controlnet"}
    base = StableDiffusionPipeline(**components)
    base.set_progress_bar_config(disable=True)
    assert psnr(plain, base(PROMPT, **diffusers_call()).images[0]) >= 35
    # The ControlNet changes the image, the more the higher its scale.
    assert psnr(plain, images[1.0][0]) < psnr(plain, images[0.5][0]) < 45


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
