"""SDXL: two text encoders, pooled text embeds and time_ids, on every format and runtime.

Same bars as SD: the torch runtime reproduces diffusers' SDXL pipelines (PSNR >= 40 dB);
ONNX Runtime and OpenVINO fp32 reproduce the torch runtime (>= 35 dB); bf16 >= 30 dB.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from diffusion_checks import (
    DIFFUSERS_SCHEDULERS,
    SIZE,
    diffusers_reference,
    generate,
    optimum_layout,
    psnr,
)

from modelkiln import load, open_artifact

pytestmark = [pytest.mark.torch, pytest.mark.slow]

MODES = ("text", "image", "inpaint")
BACKENDS = [
    pytest.param(
        "sdxl-onnxruntime-fp32", "onnxruntime", 35, marks=pytest.mark.onnxruntime, id="onnx-ort"
    ),
    pytest.param("sdxl-openvino-fp32", "openvino", 35, marks=pytest.mark.openvino, id="ir-ov"),
    pytest.param(
        "sdxl-executorch-fp32", "executorch", 35, marks=pytest.mark.executorch, id="pte-et"
    ),
]
# OpenVINO's bf16 compute on a UNet is compared mode by mode with SD (test_sd.py); the SDXL bf16
# build passes its end-to-end gate in test_bf16_profile_keeps_the_vae_decoder_in_fp32.


@pytest.fixture(scope="module")
def reference(built: Callable[..., Path]) -> dict[str, object]:
    with load(built("sdxl", "sdxl-torch-fp32")) as pipeline:
        return {mode: generate(pipeline, mode) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_torch_runtime_reproduces_diffusers(
    mode: str, reference: dict[str, object], source_dir: Callable[[str], Path]
) -> None:
    expected = diffusers_reference(source_dir("sdxl"), mode)
    assert np.asarray(expected).std() > 10, "the reference must not be a flat image"
    assert psnr(reference[mode], expected) >= 40  # type: ignore[arg-type]


@pytest.mark.parametrize(("profile", "runtime", "bound"), BACKENDS)
def test_backends_reproduce_the_torch_runtime(
    profile: str,
    runtime: str,
    bound: float,
    built: Callable[..., Path],
    reference: dict[str, object],
) -> None:
    with load(built("sdxl", profile), runtime=runtime) as pipeline:
        for mode in MODES:
            image = generate(pipeline, mode)
            assert image.size == (SIZE, SIZE)
            assert psnr(image, reference[mode]) >= bound, mode  # type: ignore[arg-type]


@pytest.mark.onnxruntime
def test_artifact_has_optimums_sdxl_io(built: Callable[..., Path]) -> None:
    import onnx

    artifact = built("sdxl", "sdxl-onnxruntime-fp32")
    files = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()}
    assert optimum_layout(artifact, "model.onnx", xl=True) <= files
    index = json.loads((artifact / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    components = open_artifact(artifact, verify=True).manifest.components
    assert list(components) == [
        "text_encoder",
        "text_encoder_2",
        "unet",
        "vae_encoder",
        "vae_decoder",
    ]
    # optimum's SDXL pipeline takes the pooled projection from text_encoder_2's first output,
    # and the penultimate hidden state by name.
    encoder_2 = onnx.load(str(artifact / "text_encoder_2" / "model.onnx"), load_external_data=False)
    outputs = [o.name for o in encoder_2.graph.output]
    assert outputs[:2] == ["text_embeds", "last_hidden_state"]
    assert outputs[2:] == ["hidden_states.0", "hidden_states.1", "hidden_states.2"]
    unet = components["unet"]
    assert list(unet.inputs) == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "text_embeds",
        "time_ids",
    ]
    # both encoders' penultimate hidden states, concatenated
    assert unet.inputs["encoder_hidden_states"].shape == ("batch", 77, 64)
    assert unet.inputs["time_ids"].shape == ("batch", 6)
    for record in components.values():
        assert record.validation.passed


@pytest.mark.openvino
def test_bf16_profile_keeps_the_vae_decoder_in_fp32(built: Callable[..., Path]) -> None:
    """diffusers upcasts SDXL's VAE (force_upcast): it overflows in half precision."""
    import openvino as ov

    artifact = built("sdxl", "sdxl-openvino-bf16")
    components = open_artifact(artifact).manifest.components
    decoder, unet = components["vae_decoder"], components["unet"]
    assert decoder.runtime["inference_precision"] == "f32"
    assert unet.runtime["inference_precision"] in ("bf16", "f32")  # f32 where no bf16 hardware
    assert decoder.validation.tolerance.atol == 1e-3

    def weight_types(component: str) -> set[str]:
        model = ov.Core().read_model(artifact / component / "openvino_model.xml")
        constants = [op for op in model.get_ops() if op.get_type_name() == "Constant"]
        return {
            c.get_element_type().get_type_name() for c in constants if np.prod(list(c.shape)) > 1
        }

    assert "f16" not in weight_types("vae_decoder")
    assert "f16" in weight_types("unet")


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
def test_every_scheduler_reproduces_diffusers(
    scheduler: str, built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    # 4 steps: SDXL's config has no skip_prk_steps, and PNDM's Runge-Kutta start needs 4.
    with load(built("sdxl", "sdxl-torch-fp32")) as pipeline:
        ours = generate(pipeline, "text", scheduler=scheduler, steps=4)
    expected = diffusers_reference(source_dir("sdxl"), "text", scheduler, num_inference_steps=4)
    assert psnr(ours, expected) >= 40


def test_nine_channel_inpainting_unet_reproduces_diffusers(
    built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    expected = diffusers_reference(source_dir("sdxl-inpaint"), "inpaint")
    with load(built("sdxl-inpaint", "sdxl-torch-fp32")) as pipeline:
        assert pipeline.task == "inpainting"
        ours = generate(pipeline, "inpaint")
    assert psnr(ours, expected) >= 40
