"""First Block Cache ([model] first_block_cache, `kiln generate --cache-threshold`): the
transformer's head on the kept tail residual is the whole transformer, the pipeline skips the
later blocks on the very steps diffusers' FirstBlockCacheConfig skips (the same pixels), every
backend runs it, and the build gates its cost end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_support import invoke
from diffusion_checks import PROMPT, SIZE, assert_build_refused, diffusers_call, generate, psnr
from PIL import Image

from modelkiln import load, open_artifact
from modelkiln.errors import InputError, ProfileError, UnsupportedError

pytestmark = [pytest.mark.torch, pytest.mark.slow]

AT_SIZE = (f"shapes.height={SIZE}", f"shapes.width={SIZE}")
CACHED = (*AT_SIZE, "model.first_block_cache=0.3")
STEPS = 8


def _inputs(family: str, config: Any) -> tuple[Any, ...]:
    import torch

    torch.manual_seed(0)
    if family == "flux":
        tokens = 16
        return (
            torch.randn(2, tokens, config.in_channels),
            torch.randn(2, 7, config.joint_attention_dim),
            torch.randn(2, config.pooled_projection_dim),
            torch.rand(2),
            torch.rand(tokens, 3) * 4,
            torch.zeros(7, 3),
            torch.full((2,), 3.5),
        )
    return (
        torch.randn(2, config.in_channels, 16, 16),
        torch.rand(2) * 1000,
        torch.randn(2, 13, config.joint_attention_dim),
        torch.randn(2, config.pooled_projection_dim),
    )


@pytest.mark.parametrize(("source", "family"), [("flux-dev", "flux"), ("sd3", "sd3")])
def test_head_on_the_tail_residual_is_the_whole_transformer(
    source: str, family: str, source_dir: Callable[[str], Path]
) -> None:
    import torch

    from modelkiln.models import stable_diffusion_modules as modules

    folder = source_dir(source) / "transformer"

    def wrapped(component: str, **options: bool) -> Any:
        model = modules.load_component(folder, pickle=False)
        return modules.wrap(component, model, family, None, **options)

    whole, plain = wrapped("transformer", block_cache=True), wrapped("transformer")
    head = wrapped("transformer_head")
    inputs = _inputs(family, plain.model.config)
    with torch.no_grad():
        out, first, tail = whole(*inputs)
        (expected,) = plain(*inputs)
        reused, head_first = head(*inputs, tail)
        other, _ = head(*inputs, torch.zeros_like(tail))
    # SD3's residuals in the latents' layout (32 features / 2² per latent), Flux's per token.
    assert first.shape == tail.shape == ((2, 8, 16, 16) if family == "sd3" else (2, 16, 32))
    assert torch.equal(out, expected)  # the residuals change nothing of the output
    # first + (whole - first) is the whole up to one rounding: a float ulp on some CPUs
    # (SD3 on an AMX Xeon), exact on others
    torch.testing.assert_close(reused, out, rtol=0, atol=1e-6)
    assert torch.equal(head_first, first)
    assert not torch.allclose(other, out, atol=1e-3)  # the tail residual is used
    # One block in the head: SD3's second joint block, Flux's single block are gone.
    assert len(head.model.transformer_blocks) == 1


def test_latent_layout_is_a_relabelling_of_sd3_tokens() -> None:
    import torch

    from modelkiln.models.first_block_cache import to_latent_layout, to_tokens

    tokens = torch.arange(2 * 12 * 16, dtype=torch.float32).reshape(2, 12, 16)
    grid = to_latent_layout(tokens, 6, 8, 2)  # 3×4 patches of 2×2 latents
    assert grid.shape == (2, 4, 6, 8)
    assert torch.equal(to_tokens(grid, 2), tokens)
    # Patch (row 1, column 2)'s first feature lands on its top-left latent.
    assert grid[0, 0, 2, 4] == tokens[0, 1 * 4 + 2, 0]


def _calls(pipeline: Any, **settings: Any) -> tuple[Image.Image, int, int]:
    """An image, and how many whole-transformer and head calls made it."""
    from modelkiln.reference import RecordingSession

    sessions = pipeline.sessions
    names = ("transformer", "transformer_head")
    recorders = {name: RecordingSession(sessions[name]) for name in names}
    sessions.update(recorders)
    try:
        image = generate(pipeline, "text", steps=STEPS, **settings)
    finally:
        sessions.update({name: recorder.inner for name, recorder in recorders.items()})
    return image, len(recorders["transformer"].feeds), len(recorders["transformer_head"].feeds)


def _diffusers_first_block_cache(source: Path, threshold: float) -> tuple[Image.Image, int]:
    """diffusers' FluxPipeline with FirstBlockCacheConfig(threshold): its image, and the steps
    that ran the later blocks (the last block's projection runs on those only)."""
    import diffusers
    from diffusers.hooks import FirstBlockCacheConfig

    pipeline = diffusers.FluxPipeline.from_pretrained(source)
    pipeline.set_progress_bar_config(disable=True)
    computed = []
    last = pipeline.transformer.single_transformer_blocks[-1].proj_out
    last.register_forward_hook(lambda *_: computed.append(1))
    pipeline.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    image = pipeline(PROMPT, **diffusers_call("text", {"num_inference_steps": STEPS})).images[0]
    return image, len(computed)


# Thresholds away from this tiny model's step-to-step changes (0.21 .. 0.51 relative).
@pytest.mark.parametrize("threshold", [0.25, 0.4])
def test_pipeline_skips_the_steps_diffusers_skips(
    threshold: float, built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    expected, computed = _diffusers_first_block_cache(source_dir("flux-dev"), threshold)
    with load(built("flux-dev", "flux-torch-fp32", *CACHED)) as pipeline:
        image, whole, heads = _calls(pipeline, cache_threshold=threshold)
    assert 1 < computed < STEPS  # some steps reuse, some compute
    assert (whole, heads) == (computed, STEPS - 1)  # the head decides every step but the first
    assert psnr(image, expected) >= 60


def test_pipeline_caches_as_built_and_exactly_at_zero(built: Callable[..., Path]) -> None:
    artifact = built("flux-dev", "flux-torch-fp32", *CACHED)
    manifest = open_artifact(artifact).manifest
    assert manifest.model_info["approximations"] == {"first_block_cache": 0.3}
    record = manifest.components["transformer_head"]
    assert "tail_blocks_residual" in record.inputs
    assert list(manifest.components["transformer"].outputs) == [
        "out_hidden_states",
        "first_block_residual",
        "tail_blocks_residual",
    ]
    with load(built("flux-dev", "flux-torch-fp32", *AT_SIZE)) as plain:
        exact = generate(plain, "text", steps=STEPS)
    with load(artifact) as pipeline:
        cached, whole, heads = _calls(pipeline)  # the build's 0.3
        uncached, every, none = _calls(pipeline, cache_threshold=0)
    assert (every, none) == (STEPS, 0)
    assert uncached == exact
    assert whole < STEPS and heads == STEPS - 1
    assert 20 <= psnr(cached, exact) < 80  # an approximation, a close one
    # One component at a time, the head resident apart: the same image.
    with load(artifact, low_memory=True) as pipeline:
        assert generate(pipeline, "text", steps=STEPS) == cached
        assert pipeline.sessions["transformer_head"].session is not None


def test_sd3_caches_per_guided_call(built: Callable[..., Path]) -> None:
    """SD3 guides in one batch of 2: one change measured over both; split guidance keeps
    one set of residuals per call, and the step where guidance ends computes again."""
    with load(built("sd3", "sd3-torch-fp32", *AT_SIZE, "model.first_block_cache=1")) as pipeline:
        batched, whole, heads = _calls(pipeline)
        _, split_whole, split_heads = _calls(pipeline, split_guidance=True)
        _, ended_whole, ended_heads = _calls(pipeline, guidance_end=0.5)
    assert np.asarray(batched).std() > 1
    assert heads == STEPS - 1 and whole < STEPS
    assert split_heads == 2 * (STEPS - 1) and split_whole < 2 * STEPS
    # Guidance ends after step 4: step 4 computes on the prompt's half, steps 5-7 decide.
    assert ended_heads == 3 + 3 and ended_whole >= 2


BACKENDS = [
    pytest.param("flux-onnxruntime-fp32", marks=pytest.mark.onnxruntime, id="onnx-ort"),
    pytest.param("flux-openvino-fp32", marks=pytest.mark.openvino, id="ir-ov"),
]


@pytest.mark.parametrize("profile", BACKENDS)
def test_every_backend_runs_the_cached_pipeline(profile: str, built: Callable[..., Path]) -> None:
    with load(built("flux-dev", "flux-torch-fp32", *CACHED)) as torch_pipeline:
        expected, whole, heads = _calls(torch_pipeline)
    with load(built("flux-dev", profile, *CACHED)) as pipeline:
        image, backend_whole, backend_heads = _calls(pipeline)
    assert (backend_whole, backend_heads) == (whole, heads)  # the same steps skipped
    assert psnr(image, expected) >= 35


def test_build_gates_first_block_cache_against_the_uncached_reference(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from modelkiln import build
    from modelkiln.errors import ValidationError

    gate = ('validation.prompts=["a red fox in a forest"]', f"validation.steps={STEPS}")
    with pytest.raises(ValidationError, match=r"lower model\.first_block_cache"):
        build(
            source_dir("flux-dev"),
            "flux-torch-fp32",
            tmp_path / "strict",
            overrides=[*CACHED, *gate, "validation.min_psnr_db=99"],
        )
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize(
    ("source", "overrides", "error", "message"),
    [
        ("flux-dev", ["model.first_block_cache=1.5"], ProfileError, r"0\.0\.\.1\.0, got 1\.5"),
        ("sd", ["model.first_block_cache=0.1"], UnsupportedError, "use model.deep_cache"),
        ("flux-dev", ["model.deep_cache=3"], UnsupportedError, "use model.first_block_cache"),
        ("hf-classifier", ["model.first_block_cache=0.1"], UnsupportedError, "SD3's and Flux"),
    ],
)
def test_first_block_cache_refuses_what_it_cannot_split(
    source: str,
    overrides: list[str],
    error: type[Exception],
    message: str,
    source_dir: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    profile = {"sd": "sd-torch-fp32", "hf-classifier": "vit-torch-fp32"}.get(
        source, "flux-torch-fp32"
    )
    assert_build_refused(source_dir(source), profile, tmp_path / "out", overrides, error, message)


def test_a_transformer_of_one_block_is_refused(tmp_path: Path) -> None:
    from modelkiln.models.step_caches import check_block_cache

    check_block_cache(tmp_path, {"num_layers": 1, "num_single_layers": 1})  # Flux: two
    with pytest.raises(UnsupportedError, match="two blocks or more"):
        check_block_cache(tmp_path, {"num_layers": 1})
    with pytest.raises(UnsupportedError, match="the first a joint one"):
        check_block_cache(tmp_path, {"num_layers": 0, "num_single_layers": 4})


def test_cache_threshold_needs_a_head_and_a_transformer(built: Callable[..., Path]) -> None:
    with load(built("flux-dev", "flux-torch-fp32", *AT_SIZE)) as pipeline:
        with pytest.raises(UnsupportedError, match=r"--set model\.first_block_cache=0\.2"):
            pipeline.text_to_image(PROMPT, steps=2, cache_threshold=0.2)
        for bad in (-0.1, 1.5, float("nan")):
            with pytest.raises(InputError, match="cache_threshold must be"):
                pipeline.text_to_image(PROMPT, steps=2, cache_threshold=bad)
    with (
        load(built("sd", "sd-torch-fp32")) as unet,
        pytest.raises(UnsupportedError, match="denoiser is a UNet"),
    ):
        unet.text_to_image(PROMPT, steps=2, cache_threshold=0.2)


def test_kiln_generate_cache_threshold(built: Callable[..., Path], tmp_path: Path) -> None:
    artifact = built("flux-dev", "flux-torch-fp32", *CACHED)
    images = {}
    for threshold in ("0", "0.3"):
        out = tmp_path / f"under-{threshold}.png"
        args = ["generate", str(artifact), "--prompt", PROMPT, "--steps", str(STEPS)]
        result = invoke(*args, "--cache-threshold", threshold, "-o", out)
        assert result.exit_code == 0, result.output
        images[threshold] = Image.open(out).convert("RGB")
    assert 20 <= psnr(images["0"], images["0.3"]) < 80
