"""Stable Diffusion 1.x/2.x: every component on every format, three pipelines on every runtime.

Parity bar (from the issue): the torch runtime reproduces diffusers' own pipeline (PSNR >= 40
dB); ONNX Runtime and OpenVINO fp32 reproduce the torch runtime (>= 35 dB); bf16 >= 30 dB.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusion_checks import (
    DIFFUSERS_SCHEDULERS,
    PROMPT,
    SIZE,
    diffusers_reference,
    generate,
    half_mask,
    init_image,
    optimum_layout,
    psnr,
)

from modelkiln import load, open_artifact
from modelkiln.errors import InputError, ProfileError, UnsupportedError

pytestmark = [pytest.mark.torch, pytest.mark.slow]

MODES = ("text", "image", "inpaint")
BACKENDS = [
    pytest.param(
        "sd-onnxruntime-fp32", "onnxruntime", 35, marks=pytest.mark.onnxruntime, id="onnx-ort"
    ),
    pytest.param(
        "sd-onnxruntime-fp32",
        "openvino",
        35,
        marks=[pytest.mark.onnxruntime, pytest.mark.openvino],
        id="onnx-ov",
    ),
    pytest.param("sd-openvino-fp32", "openvino", 35, marks=pytest.mark.openvino, id="ir-ov"),
    pytest.param("sd-openvino-bf16", "openvino", 30, marks=pytest.mark.openvino, id="ir-bf16-ov"),
    pytest.param("sd-executorch-fp32", "executorch", 35, marks=pytest.mark.executorch, id="pte-et"),
]


@pytest.fixture(scope="module")
def reference(built: Callable[..., Path]) -> dict[str, object]:
    """Images from our pipeline on the torch runtime, one per mode."""
    with load(built("sd", "sd-torch-fp32")) as pipeline:
        return {mode: generate(pipeline, mode) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_torch_runtime_reproduces_diffusers(
    mode: str, reference: dict[str, object], source_dir: Callable[[str], Path]
) -> None:
    expected = diffusers_reference(source_dir("sd"), mode)
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
    with load(built("sd", profile), runtime=runtime) as pipeline:
        for mode in MODES:
            image = generate(pipeline, mode)
            assert image.size == (SIZE, SIZE)
            assert psnr(image, reference[mode]) >= bound, mode  # type: ignore[arg-type]


@pytest.mark.onnxruntime
@pytest.mark.parametrize(
    ("profile", "model_file"),
    [
        pytest.param("sd-onnxruntime-fp32", "model.onnx", marks=pytest.mark.onnxruntime),
        pytest.param("sd-openvino-fp32", "openvino_model.xml", marks=pytest.mark.openvino),
    ],
)
def test_artifact_has_optimums_layout_and_a_full_manifest(
    profile: str, model_file: str, built: Callable[..., Path]
) -> None:
    artifact = built("sd", profile)
    files = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()}
    assert optimum_layout(artifact, model_file, xl=False) <= files
    index = json.loads((artifact / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index.get("feature_extractor", [None])[0] is None  # optimum would look for it
    vae = json.loads((artifact / "vae_decoder" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.18215  # optimum reads it from here
    manifest = open_artifact(artifact, verify=True).manifest
    assert list(manifest.components) == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    unet = manifest.components["unet"]
    assert list(unet.inputs) == ["sample", "timestep", "encoder_hidden_states"]
    if manifest.format == "openvino":  # what OpenVINO GenAI feeds, and reads
        assert (unet.inputs["timestep"].dtype, unet.inputs["timestep"].shape) == ("int64", (1,))
        assert {"tokenizer/openvino_tokenizer.xml", "tokenizer/openvino_detokenizer.xml"} <= files
    else:
        assert (unet.inputs["timestep"].dtype, unet.inputs["timestep"].shape) == ("float32", ())
    assert unet.inputs["sample"].shape == ("batch", 4, 16, 16)
    assert unet.outputs["out_sample"].shape == ("batch", 4, 16, 16)
    assert unet.validation.batch_sizes == (1,)
    assert manifest.components["vae_encoder"].outputs["latent_parameters"].shape[1] == 8
    for record in manifest.components.values():
        assert record.validation.passed
        assert record.runtime["inference_precision"] == "f32"
    assert set(manifest.source.weights_sha256) == {
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    assert manifest.model_info["vae_scale_factor"] == 2
    assert manifest.task == "text-to-image"


STATIC_BATCH_DYNAMIC_RESOLUTION = ("shapes.dynamic_batch=false", "shapes.dynamic_resolution=true")


@pytest.mark.onnxruntime
def test_dynamic_resolution_names_output_dims_after_input_dims(built: Callable[..., Path]) -> None:
    """optimum's IO binding evaluates output dim names against input dim names."""
    import onnx

    artifact = built("sd", "sd-onnxruntime-fp32", *STATIC_BATCH_DYNAMIC_RESOLUTION)
    model = onnx.load(str(artifact / "vae_decoder" / "model.onnx"), load_external_data=False)
    (output,) = model.graph.output
    dims = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
    assert dims == [1, 3, "latent_height * 2", "latent_width * 2"]
    with load(artifact) as pipeline:
        assert generate(pipeline, "text", height=48, width=64).size == (64, 48)


@pytest.mark.onnxruntime
def test_static_batch_runs_any_number_of_images(built: Callable[..., Path]) -> None:
    artifact = built("sd", "sd-onnxruntime-fp32", *STATIC_BATCH_DYNAMIC_RESOLUTION)
    manifest = open_artifact(artifact).manifest
    assert manifest.components["unet"].inputs["sample"].shape[0] == 2  # CFG-doubled
    assert manifest.components["text_encoder"].inputs["input_ids"].shape[0] == 1
    with load(artifact) as static, load(built("sd", "sd-onnxruntime-fp32")) as dynamic:
        for pipeline in (static, dynamic):
            images = pipeline.text_to_image(PROMPT, steps=2, num_images=3, seed=1)
            assert len(images) == 3
        a = static.text_to_image(PROMPT, steps=2, num_images=3, seed=1)
        b = dynamic.text_to_image(PROMPT, steps=2, num_images=3, seed=1)
        assert all(psnr(x, y) >= 35 for x, y in zip(a, b, strict=True))
        # guidance 1.0 skips the unconditional pass: the static UNet gets a padded batch
        assert static.text_to_image(PROMPT, steps=2, guidance=1.0)[0].size == (SIZE, SIZE)


@pytest.mark.onnxruntime
def test_nine_channel_inpainting_unet_reproduces_diffusers(
    built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    expected = diffusers_reference(source_dir("sd-inpaint"), "inpaint")
    with load(built("sd-inpaint", "sd-torch-fp32")) as torch_pipeline:
        assert torch_pipeline.task == "inpainting"
        ours = generate(torch_pipeline, "inpaint")
        with pytest.raises(
            UnsupportedError, match=r"inpainting UNet \(9 input channels\): use inpaint"
        ):
            torch_pipeline.text_to_image(PROMPT)
    assert psnr(ours, expected) >= 40
    with load(built("sd-inpaint", "sd-torch-fp32")) as torch_pipeline:
        # a mask of another size is resized to the image
        resized = generate(torch_pipeline, "inpaint", mask=half_mask((64, 48)))
        # the mask and masked image go with each half of a split guidance
        split = generate(torch_pipeline, "inpaint", split_guidance=True)
    assert resized.size == (SIZE, SIZE)
    assert psnr(split, expected) >= 40


def test_v_prediction_model_reproduces_diffusers(
    built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    """SD 2.x: the scheduler config travels with the artifact, prediction type included."""
    artifact = built("sd-v", "sd-torch-fp32")
    scheduler = json.loads((artifact / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    with load(artifact) as pipeline, load(built("sd", "sd-torch-fp32")) as same_weights:
        ours = generate(pipeline, "text")
        epsilon = generate(same_weights, "text")
    assert psnr(ours, diffusers_reference(source_dir("sd-v"), "text")) >= 40
    assert psnr(ours, epsilon) < 30  # the same weights read as epsilon give another image


def test_same_seed_same_pixels(built: Callable[..., Path]) -> None:
    with load(built("sd", "sd-torch-fp32")) as pipeline:
        first = generate(pipeline, "text", seed=5)
        assert psnr(first, generate(pipeline, "text", seed=5)) == float("inf")
        assert psnr(first, generate(pipeline, "text", seed=6)) < 30


def test_latents_are_the_seeds_noise_as_in_diffusers(built: Callable[..., Path]) -> None:
    """latents= is the starting noise: the seed's own noise gives the seed's image."""
    from modelkiln.diffusion.noise import TorchGenerator

    with load(built("sd", "sd-torch-fp32")) as pipeline:
        noise = TorchGenerator(5).randn((1, 4, SIZE // 2, SIZE // 2))  # the tiny VAE halves once
        given = generate(pipeline, "text", seed=0, latents=noise)
        assert psnr(given, generate(pipeline, "text", seed=5)) == float("inf")
        with pytest.raises(
            InputError, match=r"latents must be a float32 array of shape \(1, 4, 16"
        ):
            generate(pipeline, "text", latents=np.zeros((1, 4, 8, 8), np.float32))


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
@pytest.mark.parametrize(("source", "mode"), [("sd", "text"), ("sd-v", "image"), ("sd", "inpaint")])
def test_every_scheduler_reproduces_diffusers(
    scheduler: str,
    source: str,
    mode: str,
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
) -> None:
    """SD 1.x and SD 2.x v-prediction, every scheduler we name, against diffusers' pipeline
    with that scheduler: the same seed gives the same image (stochastic ones included)."""
    with load(built(source, "sd-torch-fp32")) as pipeline:
        ours = generate(pipeline, mode, scheduler=scheduler)
    expected = diffusers_reference(source_dir(source), mode, scheduler)
    assert np.asarray(expected).std() > 10
    assert psnr(ours, expected) >= 40


def test_callback_sees_every_step_and_negative_prompts_count(built: Callable[..., Path]) -> None:
    seen: list[tuple[int, float, tuple[int, ...]]] = []
    with load(built("sd", "sd-torch-fp32")) as pipeline:
        pipeline.text_to_image(
            PROMPT, steps=3, callback=lambda i, t, latents: seen.append((i, t, latents.shape))
        )
        plain = generate(pipeline, "text")
        negative = generate(pipeline, "text", negative_prompt="a dog")
    assert [i for i, _, _ in seen] == list(range(len(seen))) and len(seen) >= 3
    assert seen[0][2] == (1, 4, 16, 16)
    assert psnr(plain, negative) < 60


def test_guidance_end_is_diffusers_dynamic_cfg_at_half_the_unet_batch(
    built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    from modelkiln.reference import RecordingSession

    def stop_guidance(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        # diffusers' "dynamic classifier-free guidance" recipe: after the last guided step,
        # drop the negative half and the guidance scale.
        if step == 1:
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return tensors

    # Euler: one UNet call per step (the source's PNDM runs 5 timesteps in 4 steps).
    expected = diffusers_reference(
        source_dir("sd"),
        "text",
        "euler",
        num_inference_steps=4,
        callback_on_step_end=stop_guidance,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    with load(built("sd", "sd-torch-fp32")) as pipeline:
        recorder = RecordingSession(pipeline.sessions["unet"])
        pipeline.sessions["unet"] = recorder
        ours = generate(pipeline, "text", steps=4, guidance_end=0.5, scheduler="euler")
        full = generate(pipeline, "text", steps=4, scheduler="euler")
        # unguided (LCM's guidance 1.0): nothing to stop, the same image
        unguided = generate(pipeline, "text", steps=4, guidance=1.0)
        assert generate(pipeline, "text", steps=4, guidance=1.0, guidance_end=0.5) == unguided
    # ceil(0.5 × 4) = 2 guided steps at twice the batch, then 2 on the prompt alone
    batches = [len(feeds["sample"]) for feeds in recorder.feeds]
    assert batches[:8] == [2, 2, 1, 1] + [2] * 4
    assert batches[8:] == [1] * (len(batches) - 8)  # the unguided calls (PNDM: 5 per image)
    assert psnr(ours, expected) >= 40
    assert psnr(ours, full) < 60  # it is an approximation: the image changed


def test_build_gates_guidance_end_against_the_fully_guided_reference(
    built: Callable[..., Path], source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from modelkiln import build
    from modelkiln.errors import ValidationError

    gate = ('validation.prompts=["a red fox in a forest"]', "validation.steps=4")
    artifact = built(
        "sd", "sd-torch-fp32", "generation.guidance_end=0.5", *gate, "validation.min_psnr_db=20"
    )
    manifest = open_artifact(artifact).manifest
    assert manifest.model_info["approximations"] == {"guidance_end": 0.5}
    assert manifest.end_to_end is not None
    # Measured against the fully guided torch pipeline: a finite cost, inside the bound.
    (measured,) = manifest.end_to_end.psnr_db
    assert measured is not None and 20 <= measured < 80
    with pytest.raises(ValidationError, match=r"raise generation\.guidance_end"):
        build(
            source_dir("sd"),
            "sd-torch-fp32",
            tmp_path / "strict",
            overrides=["generation.guidance_end=0.5", *gate, "validation.min_psnr_db=99"],
        )
    assert not (tmp_path / "strict").exists()
    with pytest.raises(ProfileError, match=r"generation\.guidance_end must be a fraction"):
        build(
            source_dir("sd"),
            "sd-torch-fp32",
            tmp_path / "x",
            overrides=["generation.guidance_end=2"],
        )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.text_to_image(""), "prompt is empty"),
        (
            lambda p: p.text_to_image(42),
            "prompt must be a string or a non-empty list of strings, got 42",
        ),
        (lambda p: p.text_to_image(["a cat", 3]), "prompt must be text, got int 3"),
        (lambda p: p.text_to_image([]), "non-empty list"),
        (
            lambda p: p.text_to_image(PROMPT, width=30),
            "width must be a positive multiple of 8 up to 16384, got 30",
        ),
        (
            lambda p: p.text_to_image(PROMPT, width=64),
            r"built for 32×32 images only, not 64×32; rebuild with --set shapes.dynamic_resolution=true",
        ),
        (lambda p: p.text_to_image(PROMPT, steps=0), "steps must be in 1..1000, got 0"),
        (
            lambda p: p.text_to_image(PROMPT, guidance_end=0),
            r"guidance_end must be the fraction of the steps that are guided, in \(0, 1\]",
        ),
        (
            lambda p: p.text_to_image(PROMPT, scheduler="eulr"),
            r"unknown scheduler 'eulr' \(did you mean 'euler'\?\); available: euler, euler-ancestral",
        ),
        (
            lambda p: p.image_to_image(PROMPT, init_image(), strength=0),
            r"strength must be in \(0, 1\], got 0",
        ),
        (
            lambda p: p.image_to_image(PROMPT, init_image(), strength=1.5),
            r"strength must be in \(0, 1\], got 1.5",
        ),
        (
            lambda p: p.text_to_image(PROMPT, negative_prompt=["a", "b"]),
            "got 2 negative prompts for 1 prompts",
        ),
        (lambda p: p.image_to_image(PROMPT, "missing.png"), "no such image file: 'missing.png'"),
    ],
)
def test_bad_input_is_one_clear_error(call, message: str, built: Callable[..., Path]) -> None:  # type: ignore[no-untyped-def]
    with (
        load(built("sd", "sd-torch-fp32")) as pipeline,
        pytest.raises(InputError, match=message) as error,
    ):
        call(pipeline)
    assert "\n" not in str(error.value)


def test_long_prompts_are_truncated_with_a_message(
    built: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    with load(built("sd", "sd-torch-fp32")) as pipeline:
        pipeline.text_to_image(PROMPT + " of a cat" * 40, steps=1)
    assert any("tokens; the text encoder reads the first 77" in r.message for r in caplog.records)


def test_profile_errors_name_components_and_sizes(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from modelkiln import build

    with pytest.raises(
        ProfileError,
        match=r"\[components.unett\] but sd models have: text_encoder, unet, vae_encoder, vae_decoder \(did you mean 'unet'\?\)",
    ):
        build(
            source_dir("sd"),
            "sd-torch-fp32",
            tmp_path / "a",
            overrides=["components.unett.atol=1e-3"],
        )
    with pytest.raises(
        ProfileError, match=r"shapes\.height must be a multiple of 8 in 8\.\.16384, got 36"
    ):
        build(source_dir("sd"), "sd-torch-fp32", tmp_path / "a", overrides=["shapes.height=36"])
    with pytest.raises(
        ProfileError,
        match=r"profile 'vit-torch-fp32' is for vit models but .* is a sd model; pick a sd-\* profile",
    ):
        build(source_dir("sd"), "vit-torch-fp32", tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.openvino
def test_openvino_static_shapes_draw_the_image_of_the_dynamic_model(
    built: Callable[..., Path],
) -> None:
    """load(static_shapes=True): a compilation per batch the pipeline calls (guided and,
    after guidance_end, unguided UNet calls), each component's within its shapes."""
    artifact = built("sd", "sd-openvino-fp32")
    settings = {"guidance_end": 0.5, "steps": 4}
    with load(artifact) as pipeline:
        expected = {mode: generate(pipeline, mode, **settings) for mode in MODES}
    with load(artifact, static_shapes=True) as pipeline:
        for mode in MODES:
            assert psnr(generate(pipeline, mode, **settings), expected[mode]) >= 45, mode
        unet_shapes = [
            shapes["sample"][0] for shapes in pipeline.sessions["unet"].info["static_shapes"]
        ]
    # The unguided batch was called last; both kept.
    assert unet_shapes == [2, 1]


@pytest.mark.onnxruntime
def test_low_memory_holds_one_component_at_a_time_and_draws_the_same_image(
    built: Callable[..., Path], tmp_path: Path, kiln_main: Callable[..., Any]
) -> None:
    """load(low_memory=True) / kiln generate --low-memory: each component loads when the
    pipeline calls it and goes when the next loads; the pixels are the same."""
    from PIL import Image

    from modelkiln.runtimes.on_demand import OnDemandSession

    artifact = built("sd", "sd-onnxruntime-fp32")
    with load(artifact) as pipeline:
        expected = generate(pipeline, "inpaint", negative_prompt="blurry")
    with load(artifact, low_memory=True) as pipeline:
        sessions = list(pipeline.sessions.values())
        assert all(isinstance(s, OnDemandSession) and s.session is None for s in sessions)
        opened: list[str] = []
        for session in sessions:
            opener = session.opener

            def counted(opener: Callable[[], Any] = opener, name: str = session.name) -> Any:
                assert all(s.session is None for s in sessions), "two components at once"
                opened.append(name)
                return opener()

            session.opener = counted
        image = generate(pipeline, "inpaint", negative_prompt="blurry")
        # Each stage once: the prompts, the masked image's latents, the steps, the decode.
        assert opened == ["text_encoder", "vae_encoder", "unet", "vae_decoder"]
        assert [s.name for s in sessions if s.session is not None] == ["vae_decoder"]
        assert pipeline.sessions["unet"].info["runtime"] == "onnxruntime"  # as it ran
    assert all(s.session is None for s in sessions)  # closed with the pipeline
    assert psnr(image, expected) == float("inf")

    out = tmp_path / "low.png"
    arguments = ("--prompt", PROMPT, "--steps", 2, "--seed", 3, "-o")
    assert kiln_main("generate", artifact, *arguments, out, "--low-memory").code == 0
    assert kiln_main("generate", artifact, *arguments, tmp_path / "all.png").code == 0
    assert psnr(Image.open(out), Image.open(tmp_path / "all.png")) == float("inf")
