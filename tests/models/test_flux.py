"""Flux.1 dev (guidance embedding) and schnell: CLIP's pooled embedding and T5, a transformer on
packed 2×2 latent tokens with their positions, resolution-shifted flow matching.

The torch runtime reproduces diffusers' FluxPipeline and FluxImg2ImgPipeline (PSNR >= 40 dB),
ONNX Runtime and OpenVINO artifacts reproduce them too (>= 35 dB), and the int8 and int4
profiles pass their build's end-to-end gate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from diffusion_checks import PROMPT, SIZE, generate, half_mask, init_image, psnr
from flow_checks import NEGATIVE, diffusers_flow_reference

from modelkiln import load, open_artifact
from modelkiln.errors import InputError, ProfileError, UnsupportedError

pytestmark = [pytest.mark.torch, pytest.mark.slow]

MODES = ("text", "image")
AT_SIZE = (f"shapes.height={SIZE}", f"shapes.width={SIZE}")  # not Flux's native 1024 / 2
# One OpenVINO build serves both OpenVINO tests: it runs at the profile's size and another.
DYNAMIC = ("shapes.dynamic_resolution=true",)
# Each variant on the torch runtime, each format on one variant.
BUILDS = [
    pytest.param("flux-dev", "flux-torch-fp32", "torch", 40, (), id="torch-flux-dev"),
    pytest.param("flux-schnell", "flux-torch-fp32", "torch", 40, (), id="torch-flux-schnell"),
    pytest.param(
        "flux-dev",
        "flux-onnxruntime-fp32",
        "onnxruntime",
        35,
        (),
        marks=pytest.mark.onnxruntime,
        id="ort-flux-dev",
    ),
    pytest.param(
        "flux-schnell",
        "flux-openvino-fp32",
        "openvino",
        35,
        DYNAMIC,
        marks=pytest.mark.openvino,
        id="ov-flux-schnell",
    ),
]


@pytest.mark.parametrize(("source", "profile", "runtime", "bound", "overrides"), BUILDS)
def test_reproduces_diffusers(
    source: str,
    profile: str,
    runtime: str,
    bound: float,
    overrides: tuple[str, ...],
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
) -> None:
    artifact = built(source, profile, *AT_SIZE, *overrides)
    with load(artifact, runtime=runtime) as pipeline:
        for mode in MODES:
            expected = diffusers_flow_reference(source_dir(source), mode)
            image = generate(pipeline, mode)
            assert image.size == (SIZE, SIZE)
            assert psnr(image, expected) >= bound, mode


@pytest.mark.parametrize(
    ("source", "profile", "overrides"),
    [
        pytest.param(
            "flux-schnell", "flux-openvino-int8", (), marks=pytest.mark.openvino, id="ov-int8"
        ),
        pytest.param(
            "flux-dev",
            "flux-onnxruntime-int8",
            (),
            marks=pytest.mark.onnxruntime,
            id="ort-int8",
        ),
        # The tiny transformer's widths are 32..128: groups of 16 divide them.
        pytest.param(
            "flux-schnell",
            "flux-onnxruntime-int4",
            ("quantization.group_size=16",),
            marks=pytest.mark.onnxruntime,
            id="ort-int4",
        ),
        pytest.param(
            "flux-dev",
            "flux-openvino-int4",
            ("quantization.group_size=16",),
            marks=pytest.mark.openvino,
            id="ov-int4",
        ),
    ],
)
def test_quantized_profiles_pass_the_gate_and_generate(
    source: str,
    profile: str,
    overrides: tuple[str, ...],
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
) -> None:
    artifact = built(source, profile, *AT_SIZE, *overrides)
    gate = json.loads((artifact / "kiln.json").read_text())["end_to_end"]
    assert len(gate["psnr_db"]) == 2  # the build's gate ran the profile's two prompts
    assert min(gate["psnr_db"]) >= 15 and min(gate["ssim"]) >= 0.5
    with load(artifact) as pipeline:
        image = generate(pipeline, "text")
    assert psnr(image, diffusers_flow_reference(source_dir(source), "text")) >= 15


@pytest.mark.onnxruntime
def test_artifact_has_optimums_flux_io(built: Callable[..., Path]) -> None:
    artifact = built("flux-dev", "flux-onnxruntime-fp32", *AT_SIZE)
    components = open_artifact(artifact, verify=True).manifest.components
    assert list(components) == [
        "text_encoder",
        "text_encoder_2",
        "transformer",
        "vae_encoder",
        "vae_decoder",
    ]
    transformer = components["transformer"]
    assert list(transformer.inputs) == [
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "img_ids",
        "txt_ids",
        "guidance",
    ]
    # 16×16 latents make 8×8 tokens of 2×2×16 features; T5's 512 tokens.
    assert transformer.inputs["hidden_states"].shape == ("batch", 64, 64)
    assert transformer.inputs["txt_ids"].shape == (512, 3)
    index = json.loads((artifact / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    schnell = open_artifact(built("flux-schnell", "flux-torch-fp32", *AT_SIZE)).manifest
    assert "guidance" not in schnell.components["transformer"].inputs


def test_what_flux_does_not_take_is_refused(built: Callable[..., Path]) -> None:
    with load(built("flux-dev", "flux-torch-fp32", *AT_SIZE)) as pipeline:
        with pytest.raises(UnsupportedError, match="Flux takes no negative prompt"):
            pipeline.text_to_image(PROMPT, steps=1, negative_prompt=NEGATIVE)
        with pytest.raises(UnsupportedError, match="inpainting needs Flux Fill"):
            pipeline.inpaint(PROMPT, init_image(), half_mask())
        with pytest.raises(InputError, match="use flow-match-euler"):
            pipeline.text_to_image(PROMPT, steps=1, scheduler="dpmpp-2m")


def test_a_size_flux_cannot_pack_is_refused_before_loading() -> None:
    """With SD's VAE (8 pixels per latent) Flux needs multiples of 16: 520 passes the
    profile's multiple-of-8 check and is refused here, before any weight loads."""
    from modelkiln.models.diffusion_transformers import FluxFamily

    assert FluxFamily._dims(512, 528, 8, {})["image_tokens"] == 32 * 33
    with pytest.raises(ProfileError, match=r"shapes.height = 520 is not a multiple of 16: Flux"):
        FluxFamily._dims(520, 512, 8, {})


@pytest.mark.openvino
def test_a_flexible_resolution_reproduces_diffusers_at_another_size(
    built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    """shapes.dynamic_resolution: the image tokens follow the size (48×32 is 12×8 tokens)."""
    import diffusers
    import numpy as np
    import torch

    artifact = built("flux-schnell", "flux-openvino-fp32", *AT_SIZE, *DYNAMIC)
    with load(artifact) as pipeline:
        image = pipeline.text_to_image(PROMPT, steps=3, seed=1, height=48, width=32)[0]
    reference = diffusers.FluxPipeline.from_pretrained(source_dir("flux-schnell"))
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        PROMPT,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(1),
        height=48,
        width=32,
    ).images[0]
    assert image.size == expected.size == (32, 48)
    assert psnr(np.asarray(image), np.asarray(expected)) >= 35
