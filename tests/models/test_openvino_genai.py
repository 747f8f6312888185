"""OpenVINO GenAI runs our OpenVINO SD, SDXL, SD3 and Flux artifacts as they are.

An OpenVINO artifact carries what `openvino_genai.Text2ImagePipeline` reads besides the
optimum-intel layout: tokenizer IRs (openvino-tokenizers) and a UNet that takes GenAI's int64
timestep. GenAI has its own copy of torch's generator, so the same seed starts both pipelines
from the same noise: with the same scheduler their images agree closely.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from diffusion_checks import PROMPT, SIZE, psnr

from modelkiln import load

genai = pytest.importorskip("openvino_genai", reason="openvino-genai is not installed")
pytestmark = [pytest.mark.torch, pytest.mark.openvino, pytest.mark.slow]
STEPS = 4


def genai_image(artifact: Path, **settings: object) -> np.ndarray:
    # f32, as our fp32 profiles pin: GenAI would leave OpenVINO's bf16 on AMX CPUs.
    pipeline = genai.Text2ImagePipeline(str(artifact), "CPU", INFERENCE_PRECISION_HINT="f32")
    result = pipeline.generate(
        PROMPT,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        generator=genai.TorchGenerator(0),
        **settings,
    )
    return np.asarray(result.data[0])


@pytest.mark.parametrize(
    ("source", "profile", "overrides"),
    [
        ("sd", "sd-openvino-fp32", ()),
        ("sdxl", "sdxl-openvino-fp32", ()),
        ("sd3", "sd3-openvino-fp32", ()),  # CLIP-L, CLIP-G and T5 tokenizer IRs
        ("flux-dev", "flux-openvino-fp32", (f"shapes.height={SIZE}", f"shapes.width={SIZE}")),
    ],
)
def test_openvino_genai_generates_our_image_from_our_artifact(
    source: str, profile: str, overrides: tuple[str, ...], built: Callable[..., Path]
) -> None:
    artifact = built(source, profile, *overrides)
    folders = sorted(p for p in artifact.glob("tokenizer*") if p.is_dir())
    assert len(folders) == {"sd": 1, "sdxl": 2, "sd3": 3, "flux-dev": 2}[source]
    for folder in folders:
        assert (folder / "openvino_tokenizer.xml").is_file()
    with load(artifact) as pipeline:
        guidance = pipeline.default_guidance["text"]
        ours = np.asarray(pipeline.text_to_image(PROMPT, steps=STEPS, seed=0)[0])
    theirs = genai_image(artifact, guidance_scale=guidance)
    assert theirs.shape == ours.shape == (SIZE, SIZE, 3)
    assert theirs.std() > 10, "not a flat image"
    assert psnr(ours, theirs) >= 35


def test_the_genai_timestep_costs_nothing_on_our_side(built: Callable[..., Path]) -> None:
    """The OpenVINO UNet's int64 timestep gives the same image as the ONNX one's float32."""
    with (
        load(built("sd", "sd-openvino-fp32")) as openvino,
        load(built("sd", "sd-onnxruntime-fp32")) as onnx,
    ):
        assert openvino.sessions["unet"].input_specs["timestep"].dtype == "int64"
        assert onnx.sessions["unet"].input_specs["timestep"].dtype == "float32"
        first = openvino.text_to_image(PROMPT, steps=STEPS, seed=0)[0]
        second = onnx.text_to_image(PROMPT, steps=STEPS, seed=0)[0]
    assert psnr(first, second) >= 35
