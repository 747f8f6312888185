"""DeepCache ([model] deep_cache, `kiln generate --cache-interval`): the shallow UNet is the
whole UNet's forward on the kept features, the pipeline calls it on the steps between
whole-UNet steps, every backend runs it, and the build gates its cost end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cli_support import invoke
from diffusion_checks import PROMPT, assert_build_refused, generate, psnr
from PIL import Image

from modelkiln import load, open_artifact
from modelkiln.errors import InputError, ProfileError, UnsupportedError
from modelkiln.models import FAMILIES

pytestmark = [pytest.mark.torch, pytest.mark.slow]

CACHED = ("model.deep_cache=3",)


@pytest.mark.parametrize("source", ["sd", "sdxl"])
def test_shallow_unet_on_the_kept_features_is_the_whole_unet(
    source: str, source_dir: Callable[[str], Path]
) -> None:
    import torch

    from modelkiln.models import stable_diffusion_modules as modules
    from modelkiln.models.deep_cache import ShallowUNet, ShallowUNetXL

    unet = modules.load_component(source_dir(source) / "unet", pickle=False)
    xl = source == "sdxl"
    whole = modules.wrap("unet", unet, source, None, deep_cache=True)
    shallow_class = ShallowUNetXL if xl else ShallowUNet
    torch.manual_seed(0)
    sample, timestep = torch.randn(2, 4, 16, 16), torch.tensor(401.0)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    extra = (torch.randn(2, 32), torch.randn(2, 6)) if xl else ()
    with torch.no_grad():
        out, features = whole(sample, timestep, text, *extra)
        (shallow,) = shallow_class(unet)(sample, timestep, text, *extra, features)
        other = shallow_class(unet)(sample, timestep, text, *extra, torch.zeros_like(features))
    assert features.shape == (2, 32, 16, 16)  # block_out_channels[0], at the latents' size
    assert torch.equal(shallow, out)
    assert not torch.allclose(other[0], out, atol=1e-3)  # the features are used


@pytest.mark.parametrize(
    ("layers", "down", "up"),
    [
        (2, ("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")),
        (3, ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")),
    ],
)
def test_shallow_unet_takes_the_skips_of_deeper_first_blocks(
    layers: int, down: tuple[str, ...], up: tuple[str, ...]
) -> None:
    """SD's UNets have 2 layers per block (the fixtures 1): the shallow UNet runs the first
    down block's layers but its last and takes their skips in the up block's order."""
    import torch
    from diffusers import UNet2DConditionModel

    from modelkiln.models import stable_diffusion_modules as modules
    from modelkiln.models.deep_cache import ShallowUNet

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=layers,
        block_out_channels=(32, 64),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    sample, timestep, text = torch.randn(2, 4, 8, 8), torch.tensor(300.0), torch.randn(2, 7, 32)
    with torch.no_grad():
        out, features = modules.wrap("unet", unet, "sd", None, deep_cache=True)(
            sample, timestep, text
        )
        (shallow,) = ShallowUNet(unet)(sample, timestep, text, features)
    assert torch.equal(shallow, out)


def _unet_calls(pipeline: object, **settings: object) -> tuple[object, list[int], list[int]]:
    """An image, and the batch of each whole-UNet and each shallow-UNet call that made it."""
    from modelkiln.reference import RecordingSession

    sessions = pipeline.sessions  # type: ignore[attr-defined]
    recorders = {name: RecordingSession(sessions[name]) for name in ("unet", "unet_shallow")}
    sessions.update(recorders)
    try:
        image = generate(pipeline, "text", scheduler="euler", steps=6, **settings)
    finally:
        sessions.update({name: recorder.inner for name, recorder in recorders.items()})
    batches = {name: [len(f["sample"]) for f in r.feeds] for name, r in recorders.items()}
    return image, batches["unet"], batches["unet_shallow"]


def test_pipeline_reuses_the_deep_features_between_whole_unet_steps(
    built: Callable[..., Path],
) -> None:
    artifact = built("sd", "sd-torch-fp32", *CACHED)
    manifest = open_artifact(artifact).manifest
    assert manifest.model_info["approximations"] == {"deep_cache": 3}
    assert list(manifest.components) == [
        "text_encoder",
        "unet",
        "unet_shallow",
        "vae_encoder",
        "vae_decoder",
    ]
    # A bundle's README tells an app how to run the two UNets.
    notes = FAMILIES.get("sd").app_notes(manifest, [])
    assert "DeepCache: run `unet` on one step in 3 and keep its `deep_features`" in notes
    with load(built("sd", "sd-torch-fp32")) as plain:
        exact = generate(plain, "text", scheduler="euler", steps=6)
    with load(artifact) as pipeline:
        cached, whole, shallow = _unet_calls(pipeline)
        # Steps 0 and 3 run the whole UNet (guided: a batch of 2); 1, 2, 4, 5 the shallow.
        assert (whole, shallow) == ([2, 2], [2] * 4)
        uncached, whole, shallow = _unet_calls(pipeline, cache_interval=1)
        assert (whole, shallow) == ([2] * 6, [])
        # Guidance ends after step 2: step 3 runs the whole UNet on the prompt's half, and
        # split guidance keeps one set of features per call.
        _, whole, shallow = _unet_calls(pipeline, guidance_end=0.5, split_guidance=True)
        assert (whole, shallow) == ([1, 1, 1], [1] * 6)
    assert uncached == exact  # cache_interval 1: the exact pipeline
    assert 25 <= psnr(cached, exact) < 80  # an approximation, a close one
    # One component at a time, but the shallow UNet resident apart: the same image.
    with load(artifact, low_memory=True) as pipeline:
        assert generate(pipeline, "text", scheduler="euler", steps=6) == cached
        assert pipeline.sessions["unet"].session is None  # let go when the VAE opened
        assert pipeline.sessions["unet_shallow"].session is not None


BACKENDS = [
    pytest.param("sd-onnxruntime-fp32", marks=pytest.mark.onnxruntime, id="onnx-ort"),
    pytest.param("sd-openvino-fp32", marks=pytest.mark.openvino, id="ir-ov"),
]


@pytest.mark.parametrize("profile", BACKENDS)
def test_every_backend_runs_the_cached_pipeline(profile: str, built: Callable[..., Path]) -> None:
    with load(built("sd", "sd-torch-fp32", *CACHED)) as torch_pipeline:
        expected = generate(torch_pipeline, "text", steps=6)
    artifact = built("sd", profile, *CACHED)
    record = open_artifact(artifact).manifest.components["unet_shallow"]
    assert "deep_features" in record.inputs
    with load(artifact) as pipeline:
        assert psnr(generate(pipeline, "text", steps=6), expected) >= 35


def test_sdxl_caches_steps(built: Callable[..., Path]) -> None:
    with load(built("sdxl", "sdxl-torch-fp32", "model.deep_cache=2")) as pipeline:
        image, whole, shallow = _unet_calls(pipeline)
        _, _, none = _unet_calls(pipeline, cache_interval=1)
    assert (whole, shallow, none) == ([2] * 3, [2] * 3, [])
    assert np.asarray(image).std() > 1


def test_build_gates_deep_cache_against_the_uncached_reference(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from modelkiln import build
    from modelkiln.errors import ValidationError

    gate = ('validation.prompts=["a red fox in a forest"]', "validation.steps=6")
    with pytest.raises(ValidationError, match=r"lower model\.deep_cache"):
        build(
            source_dir("sd"),
            "sd-torch-fp32",
            tmp_path / "strict",
            overrides=[*CACHED, *gate, "validation.min_psnr_db=99"],
        )
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize(
    ("source", "profile", "overrides", "error", "message"),
    [
        ("sd", "sd-torch-fp32", ["model.deep_cache=1"], ProfileError, "would never reuse"),
        ("sd", "sd-torch-fp32", ["model.deep_cache=-2"], ProfileError, r"0\.\.1000"),
        (
            "sd",
            "sd-onnxruntime-lora",
            list(CACHED),
            UnsupportedError,
            r"deep_cache and \[runtime_lora\] do not combine",
        ),
        (
            "sd-controlnet",
            "sd-torch-fp32",
            list(CACHED),
            UnsupportedError,
            "not built for ControlNet pipelines",
        ),
        ("sd3", "sd3-torch-fp32", list(CACHED), UnsupportedError, "does not apply to sd3"),
        ("hf-classifier", "vit-torch-fp32", list(CACHED), UnsupportedError, "SDXL UNets"),
    ],
)
def test_deep_cache_refuses_what_it_cannot_split(
    source: str,
    profile: str,
    overrides: list[str],
    error: type[Exception],
    message: str,
    source_dir: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    assert_build_refused(source_dir(source), profile, tmp_path / "out", overrides, error, message)


def test_cache_interval_needs_a_shallow_unet_and_a_whole_number(
    built: Callable[..., Path],
) -> None:
    with load(built("sd", "sd-torch-fp32")) as pipeline:
        with pytest.raises(UnsupportedError, match=r"rebuild it with --set model\.deep_cache=3"):
            pipeline.text_to_image(PROMPT, steps=2, cache_interval=3)
        for bad in (0, 2.5, True):
            with pytest.raises(InputError, match="cache_interval must be"):
                pipeline.text_to_image(PROMPT, steps=2, cache_interval=bad)
    with (
        load(built("sd3", "sd3-torch-fp32")) as flow,
        pytest.raises(UnsupportedError, match="denoiser is a transformer"),
    ):
        flow.text_to_image(PROMPT, steps=2, cache_interval=2)


def test_kiln_generate_cache_interval(built: Callable[..., Path], tmp_path: Path) -> None:
    artifact = built("sd", "sd-torch-fp32", *CACHED)
    images = {}
    for interval in ("1", "3"):
        out = tmp_path / f"every-{interval}.png"
        args = ["generate", str(artifact), "--prompt", PROMPT, "--steps", "6"]
        result = invoke(*args, "--cache-interval", interval, "-o", out)
        assert result.exit_code == 0, result.output
        images[interval] = Image.open(out).convert("RGB")
    assert 25 <= psnr(images["1"], images["3"]) < 80
    plain = built("sd", "sd-torch-fp32")
    refused = invoke(
        "generate", plain, "--prompt", PROMPT, "--cache-interval", 2, "-o", tmp_path / "x.png"
    )
    assert refused.exit_code != 0
    assert "model.deep_cache=2" in str(refused.exception)


def test_calibration_records_the_shallow_unet_as_the_artifact_runs_it(
    source_dir: Callable[[str], Path],
) -> None:
    from modelkiln.models import detect_family
    from modelkiln.plan import load_profile
    from modelkiln.progress import NullProgress
    from modelkiln.reference import pipeline_class
    from modelkiln.sources import resolve_source

    overrides = ['calibration.prompts=["a red cube"]', "calibration.size=2"]
    profile = load_profile("sd-openvino-int8-hybrid", [*overrides, "calibration.steps=6", *CACHED])
    resolved = resolve_source(source_dir("sd"))
    loaded = detect_family(resolved).load(resolved, profile)
    names = ["unet", "unet_shallow"]
    feeds = pipeline_class(loaded).calibration_feeds(loaded, profile, names, NullProgress())
    # PNDM runs 7 timesteps in 6 steps: the whole UNet on 0, 3 and 6 of each run.
    assert (len(feeds["unet"]), len(feeds["unet_shallow"])) == (2 * 3, 2 * 4)
    assert feeds["unet_shallow"][0]["deep_features"].shape == (2, 32, 16, 16)
