"""SD 3 / 3.5: two CLIPs and an optional T5, an MMDiT transformer, flow matching, a 16-channel
VAE with a shift; text-to-image, image-to-image and inpainting on every format and runtime.

The torch runtime reproduces diffusers' SD3 pipelines (PSNR >= 40 dB); ONNX Runtime and
OpenVINO fp32 artifacts reproduce diffusers too (>= 35 dB); int8 profiles pass their build's
end-to-end gate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusion_checks import PROMPT, SIZE, generate, psnr
from flow_checks import NEGATIVE, diffusers_flow_reference

from modelkiln import load, open_artifact
from modelkiln.errors import InputError

pytestmark = [pytest.mark.torch, pytest.mark.slow]

MODES = ("text", "image", "inpaint")
# One OpenVINO build serves every OpenVINO test here: fixed-size ones run it at the profile's
# size (static shapes: tests/models/test_by_block.py, test_openvino_genai.py).
DYNAMIC = ("shapes.dynamic_resolution=true",)
FP32 = [
    pytest.param(
        "sd3-onnxruntime-fp32", "onnxruntime", (), marks=pytest.mark.onnxruntime, id="ort"
    ),
    pytest.param("sd3-openvino-fp32", "openvino", DYNAMIC, marks=pytest.mark.openvino, id="ov"),
]


@pytest.fixture(scope="module")
def diffusers_images(source_dir: Callable[[str], Path]) -> dict[str, object]:
    source = source_dir("sd3")
    images = {mode: diffusers_flow_reference(source, mode) for mode in MODES}
    images["negative"] = diffusers_flow_reference(source, "text", negative_prompt=NEGATIVE)
    return images


def generate_all(pipeline: object) -> dict[str, object]:
    images = {mode: generate(pipeline, mode) for mode in MODES}
    images["negative"] = generate(pipeline, "text", negative_prompt=NEGATIVE)
    return images


def test_torch_runtime_reproduces_diffusers(
    built: Callable[..., Path], diffusers_images: dict[str, object]
) -> None:
    with load(built("sd3", "sd3-torch-fp32")) as pipeline:
        ours = generate_all(pipeline)
    for mode, expected in diffusers_images.items():
        assert np.asarray(expected).std() > 10, "the reference must not be a flat image"
        assert psnr(ours[mode], expected) >= 40, mode  # type: ignore[arg-type]


@pytest.mark.parametrize(("profile", "runtime", "overrides"), FP32)
def test_fp32_backends_reproduce_diffusers(
    profile: str,
    runtime: str,
    overrides: tuple[str, ...],
    built: Callable[..., Path],
    diffusers_images: dict[str, object],
) -> None:
    with load(built("sd3", profile, *overrides), runtime=runtime) as pipeline:
        ours = generate_all(pipeline)
        # Guidance's halves in two calls: the same image (batch 1 and 2 round alike).
        split = generate(pipeline, "inpaint", negative_prompt=NEGATIVE, split_guidance=True)
        batched = generate(pipeline, "inpaint", negative_prompt=NEGATIVE)
    for mode, expected in diffusers_images.items():
        assert ours[mode].size == (SIZE, SIZE)  # type: ignore[attr-defined]
        assert psnr(ours[mode], expected) >= 35, mode  # type: ignore[arg-type]
    assert np.asarray(split).std() > 10 and psnr(split, batched) >= 45


@pytest.mark.parametrize(
    ("source", "profile"),
    [
        pytest.param("sd3-no-t5", "sd3-openvino-fp32", marks=pytest.mark.openvino, id="no-t5"),
        pytest.param("sd3.5", "sd3-onnxruntime-fp32", marks=pytest.mark.onnxruntime, id="3.5"),
    ],
)
def test_variants_reproduce_diffusers(
    source: str, profile: str, built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    """Without T5 (zeros in its place, as diffusers), and SD 3.5's qk-norm + dual attention."""
    artifact = built(source, profile)
    components = open_artifact(artifact).manifest.components
    assert ("text_encoder_3" in components) == (source != "sd3-no-t5")
    with load(artifact) as pipeline:
        for mode in ("text", "image"):
            expected = diffusers_flow_reference(source_dir(source), mode)
            assert psnr(generate(pipeline, mode), expected) >= 35, mode


# sd3-openvino-int8 passes its gate built by block: tests/models/test_by_block.py.
@pytest.mark.parametrize(
    ("profile", "runtime"),
    [
        pytest.param(
            "sd3-onnxruntime-int8", "onnxruntime", marks=pytest.mark.onnxruntime, id="ort-int8"
        ),
        pytest.param("sd3-openvino-int4", "openvino", marks=pytest.mark.openvino, id="ov-int4"),
        pytest.param(
            "sd3-onnxruntime-int4", "onnxruntime", marks=pytest.mark.onnxruntime, id="ort-int4"
        ),
    ],
)
def test_quantized_profiles_pass_the_gate_and_generate(
    profile: str, runtime: str, built: Callable[..., Path], diffusers_images: dict[str, object]
) -> None:
    # The tiny transformer's widths take 4-bit groups of 16.
    small = ("quantization.group_size=16",)
    artifact = built("sd3", profile, *(small if "int4" in profile else ()))
    manifest = json.loads((artifact / "kiln.json").read_text())
    if "int4" in profile:  # 4-bit where the compute is; the text encoders keep 8 bits
        schemes = {n: c["quantization"]["scheme"] for n, c in manifest["components"].items()}
        assert schemes["transformer"] == "int4-weights"
        encoders = {schemes[f"text_encoder{s}"] for s in ("", "_2", "_3")}
        assert encoders == {"int8-dynamic" if runtime == "onnxruntime" else "int8-weights"}
    gate = manifest["end_to_end"]
    assert len(gate["psnr_db"]) == 2  # the build's gate ran the profile's two prompts
    assert min(gate["psnr_db"]) >= 15 and min(gate["ssim"]) >= 0.5
    with load(artifact, runtime=runtime) as pipeline:
        image = generate(pipeline, "text")
    assert psnr(image, diffusers_images["text"]) >= 15  # type: ignore[arg-type]


@pytest.mark.onnxruntime
def test_onnx_int4_by_block_writes_what_the_whole_build_writes(built: Callable[..., Path]) -> None:
    """Quantized as the streamed export is written (build.by_block), the transformer is the
    model that the int4 handler makes of the whole fp32 export, and scores the same."""
    import onnx
    from onnx import numpy_helper

    small = "quantization.group_size=16"
    no_gate = ("validation.prompts=[]", "validation.min_psnr_db=", "validation.min_ssim=")
    profile = "sd3-onnxruntime-int4"
    streamed = built("sd3", profile, small, "build.by_block=always", *no_gate)
    whole = built("sd3", profile, small)  # the gated build of the test above
    manifests = [json.loads((a / "kiln.json").read_text()) for a in (streamed, whole)]
    transformers = [m["components"]["transformer"] for m in manifests]
    keys = ("quantized_weights", "ops", "padded_layers", "float_matmuls", "symmetric", "block_size")
    keys += ("from_gemm",)
    for key in keys:
        assert transformers[0]["quantization"][key] == transformers[1]["quantization"][key], key
    assert transformers[0]["quantization"]["quantized_weights"] > 20
    # The AdaLN modulations (Linear on the 2-D time embedding) are Gemms: int4 too.
    assert transformers[0]["quantization"]["from_gemm"] >= 4
    assert transformers[0]["quantization"]["float_matmuls"]["Gemm"] == 0
    assert transformers[0]["validation"]["outputs"] == transformers[1]["validation"]["outputs"]
    graphs = [onnx.load(str(a / "transformer" / "model.onnx")).graph for a in (streamed, whole)]
    arrays = [{t.name: numpy_helper.to_array(t) for t in g.initializer} for g in graphs]
    assert arrays[0].keys() == arrays[1].keys()
    for name, array in arrays[1].items():
        assert np.array_equal(arrays[0][name], array), name
    assert [n.op_type for n in graphs[0].node] == [n.op_type for n in graphs[1].node]


@pytest.mark.onnxruntime
def test_artifact_has_optimums_sd3_layout(built: Callable[..., Path]) -> None:
    artifact = built("sd3", "sd3-onnxruntime-fp32")
    components = open_artifact(artifact, verify=True).manifest.components
    assert list(components) == [
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "transformer",
        "vae_encoder",
        "vae_decoder",
    ]
    transformer = components["transformer"]
    assert list(transformer.inputs) == [
        "hidden_states",
        "timestep",
        "encoder_hidden_states",
        "pooled_projections",
    ]
    assert list(transformer.outputs) == ["out_hidden_states"]
    # CLIP's 77 tokens then T5's 256, at T5's width
    assert transformer.inputs["encoder_hidden_states"].shape == ("batch", 77 + 256, 128)
    for name in ("tokenizer_3/tokenizer.json", "text_encoder_3/model.onnx", "model_index.json"):
        assert (artifact / name).is_file(), name
    config = json.loads((artifact / "text_encoder_3" / "config.json").read_text())
    assert config["export_model_type"] == "t5-encoder"


def test_schedulers_other_than_flow_matching_are_refused(built: Callable[..., Path]) -> None:
    with (
        load(built("sd3", "sd3-torch-fp32")) as pipeline,
        pytest.raises(InputError, match="trained for flow matching: use flow-match-euler"),
    ):
        pipeline.text_to_image(PROMPT, steps=2, scheduler="euler")


@pytest.mark.openvino
def test_kiln_generate_reproduces_diffusers(
    built: Callable[..., Path],
    diffusers_images: dict[str, object],
    tmp_path: Path,
    kiln_main: Callable[..., Any],
) -> None:
    """The command line's defaults are diffusers' (guidance 7.0), like the API's."""
    from PIL import Image

    out = tmp_path / "image.png"
    artifact = built("sd3", "sd3-openvino-fp32", *DYNAMIC)
    outcome = kiln_main(
        "generate", artifact, "--prompt", PROMPT, "--steps", 3, "--seed", 0, "-o", out
    )
    assert outcome.code == 0, outcome.err
    assert psnr(Image.open(out), diffusers_images["text"]) >= 35  # type: ignore[arg-type]
    split = tmp_path / "split.png"
    arguments = ("--prompt", PROMPT, "--steps", 3, "--seed", 0, "--split-guidance", "-o", split)
    assert kiln_main("generate", artifact, *arguments).code == 0
    assert psnr(Image.open(split), Image.open(out)) >= 45


@pytest.mark.openvino
def test_a_flexible_resolution_reproduces_diffusers_at_another_size(
    built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    import diffusers
    import torch

    artifact = built("sd3", "sd3-openvino-fp32", *DYNAMIC)
    with load(artifact) as pipeline:
        image = pipeline.text_to_image(PROMPT, steps=3, seed=1, height=48, width=64)[0]
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(source_dir("sd3"))
    reference.set_progress_bar_config(disable=True)
    expected = reference(
        PROMPT,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(1),
        height=48,
        width=64,
    ).images[0]
    assert image.size == expected.size == (64, 48)
    assert psnr(np.asarray(image), np.asarray(expected)) >= 35


def test_a_text_encoder_without_its_tokenizer_is_refused(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    import shutil

    from modelkiln import build
    from modelkiln.errors import SourceError

    source = tmp_path / "sd3"
    shutil.copytree(source_dir("sd3"), source)
    shutil.rmtree(source / "tokenizer_3")
    with pytest.raises(SourceError, match=r"has text_encoder_3/ but no tokenizer_3/"):
        build(source, "sd3-torch-fp32", tmp_path / "art")
    assert not (tmp_path / "art").exists()
