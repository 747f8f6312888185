"""ToMe for SD ([model] token_merging_ratio): our export-friendly merge is tomesd's, to the
float; the hooked UNet is tomesd's patched UNet; every backend exports the merged UNet at
fp32 parity with it, and the build gates what merging costs against the unmerged pipeline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from diffusion_checks import assert_build_refused, generate, psnr

from modelkiln import load, open_artifact
from modelkiln.errors import ProfileError, UnsupportedError

pytestmark = [pytest.mark.torch, pytest.mark.slow]

GATE = ('validation.prompts=["a red fox in a forest"]', "validation.steps=4")
MERGED = ("model.token_merging_ratio=0.5", *GATE, "validation.min_psnr_db=20")


@pytest.mark.parametrize(("height", "width", "r"), [(8, 8, 20), (6, 10, 45), (7, 9, 10)])
def test_merge_and_unmerge_are_tomesds(height: int, width: int, r: int) -> None:
    import torch
    from tomesd.merge import bipartite_soft_matching_random2d

    from modelkiln.models.unet_token_merging import Merge

    generator = torch.Generator().manual_seed(height * width)
    metric = torch.randn(2, height * width, 16, generator=generator)
    tokens = torch.randn(2, height * width, 16, generator=generator)
    merge, unmerge = bipartite_soft_matching_random2d(metric, width, height, 2, 2, r, no_rand=True)
    ours = Merge(metric, height, width, r)
    theirs_merged, ours_merged = merge(tokens), ours.merge(tokens)
    # r is capped at the sources (3 of every full 2x2 window and the odd edges)
    assert ours_merged.shape == theirs_merged.shape == (2, height * width - ours.r, 16)
    # The same merged tokens (our sources are in another order: attention ignores it) ...
    torch.testing.assert_close(
        ours_merged.sort(dim=1).values, theirs_merged.sort(dim=1).values, rtol=0, atol=1e-6
    )

    # ... so any per-token function unmerges to the same tokens in their places.
    def attend(merged: torch.Tensor) -> torch.Tensor:
        return torch.tanh(merged) * 3

    torch.testing.assert_close(
        ours.unmerge(attend(ours_merged)), unmerge(attend(theirs_merged)), rtol=0, atol=1e-6
    )


def _tiny_unet(xl: bool) -> Any:
    """tiny_sd's UNet in SD's layout (attention in the first down block) or SDXL's (none
    there), seeded."""
    import torch

    from modelkiln.testing.diffusion import tiny_unet

    torch.manual_seed(0)
    return tiny_unet(xl_layout=xl).eval()


@pytest.mark.parametrize(("xl", "ratio"), [(False, 0.5), (False, 0.75), (True, 0.5)])
def test_hooked_unet_is_tomesds_patched_unet(xl: bool, ratio: float) -> None:
    import copy

    import tomesd
    import torch

    from modelkiln.models.unet_token_merging import merge_unet_tokens

    unet = _tiny_unet(xl)
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor(10), torch.randn(2, 7, 32))
    patched = copy.deepcopy(unet)
    # SDXL's highest resolution with attention is the latent's half: tomesd's max_downsample=2
    tomesd.apply_patch(patched, ratio=ratio, use_rand=False, max_downsample=2 if xl else 1)
    hooked = merge_unet_tokens(copy.deepcopy(unet), ratio)
    with torch.no_grad():
        exact, theirs, ours = (model(*inputs).sample for model in (unet, patched, hooked))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - exact).abs().max() > 1e-3  # tokens were merged


def test_the_shallow_unet_merges_too(source_dir: Callable[[str], Path]) -> None:
    """DeepCache's shallow UNet runs the first down block's attention: merged alike."""
    import torch

    from modelkiln.models import stable_diffusion_modules as modules
    from modelkiln.models.deep_cache import SHALLOW_UNET

    folder = source_dir("sd") / "unet"

    def wrapped(component: str, **options: Any) -> Any:
        model = modules.load_component(folder, pickle=False)
        return modules.wrap(component, model, "sd", None, **options)

    torch.manual_seed(0)
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor(10.0), torch.randn(2, 77, 32))
    with torch.no_grad():
        _, features = wrapped("unet", deep_cache=True)(*inputs)
        (merged,) = wrapped(SHALLOW_UNET, token_merging=0.5)(*inputs, features)
        (exact,) = wrapped(SHALLOW_UNET)(*inputs, features)
    assert merged.shape == exact.shape
    assert (merged - exact).abs().max() > 1e-3


BACKENDS = [
    pytest.param("sd-torch-fp32", id="torch"),
    pytest.param("sd-onnxruntime-fp32", marks=pytest.mark.onnxruntime, id="onnx-ort"),
    pytest.param("sd-openvino-fp32", marks=pytest.mark.openvino, id="ir-ov"),
]


@pytest.mark.parametrize("profile", BACKENDS)
def test_every_backend_runs_the_merged_unet_gated_against_the_unmerged(
    profile: str, built: Callable[..., Path]
) -> None:
    artifact = built("sd", profile, *MERGED)
    manifest = open_artifact(artifact).manifest
    assert manifest.model_info["approximations"] == {"token_merging_ratio": 0.5}
    # The export against the merged torch UNet: fp32 parity.
    unet = manifest.components["unet"].validation
    assert unet.passed and unet.outputs["out_sample"].max_abs < 1e-4
    # The end-to-end gate against the unmerged pipeline: a finite cost, inside the bound.
    assert manifest.end_to_end is not None
    (measured,) = manifest.end_to_end.psnr_db
    assert measured is not None and 20 <= measured < 80
    with load(built("sd", "sd-torch-fp32", *MERGED)) as torch_merged:
        expected = generate(torch_merged, "text", steps=4)
    with load(built("sd", "sd-torch-fp32", *GATE)) as unmerged:
        exact = generate(unmerged, "text", steps=4)
    with load(artifact) as pipeline:
        image = generate(pipeline, "text", steps=4)
    assert psnr(image, expected) >= 35  # the same merged pipeline
    assert np.asarray(image).std() > 1
    if profile != "sd-torch-fp32":
        assert psnr(image, exact) < psnr(image, expected)  # nearer the merged one


def test_build_refuses_a_merged_unet_below_the_quality_bound(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    from modelkiln import build
    from modelkiln.errors import ValidationError

    strict = ["model.token_merging_ratio=0.75", *GATE, "validation.min_psnr_db=99"]
    with pytest.raises(ValidationError, match=r"lower model\.token_merging_ratio"):
        build(source_dir("sd"), "sd-torch-fp32", tmp_path / "strict", overrides=strict)
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize(
    ("source", "profile", "overrides", "error", "message"),
    [
        ("sd", "sd-torch-fp32", ["model.token_merging_ratio=0.8"], ProfileError, r"0\.75"),
        ("sd", "sd-torch-fp32", ["model.token_merging=8"], UnsupportedError, "_ratio"),
        (
            "sd",
            "sd-torch-fp32",
            ["model.token_merging_ratio=0.5", "shapes.dynamic_resolution=true"],
            UnsupportedError,
            "dynamic_resolution = false",
        ),
        ("sd3", "sd3-torch-fp32", ["model.token_merging_ratio=0.5"], UnsupportedError, "SDXL"),
        (
            "hf-classifier",
            "vit-torch-fp32",
            ["model.token_merging_ratio=0.5"],
            UnsupportedError,
            "use model.token_merging$",
        ),
    ],
)
def test_token_merging_ratio_refuses_what_it_cannot_merge(
    source: str,
    profile: str,
    overrides: list[str],
    error: type[Exception],
    message: str,
    source_dir: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    assert_build_refused(source_dir(source), profile, tmp_path / "out", overrides, error, message)


def test_a_unet_without_attention_is_refused() -> None:
    from diffusers import UNet2DConditionModel

    from modelkiln.models.unet_token_merging import merge_unet_tokens

    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    with pytest.raises(UnsupportedError, match="no down block with attention"):
        merge_unet_tokens(unet, 0.5)
    assert merge_unet_tokens(unet, 0.0) is unet  # off: nothing to find


def test_tensorrt_is_refused_a_grid_its_topk_cannot_rank(tmp_path: Path) -> None:
    from modelkiln.models.step_caches import check_token_merging

    sd = {"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]}
    xl = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}
    check_token_merging(tmp_path, sd, (64, 64), "tensorrt")  # 512x512: 3072 sources
    check_token_merging(tmp_path, sd, (96, 96), "onnx")
    check_token_merging(tmp_path, xl, (128, 128), "tensorrt")  # SDXL merges at 64x64
    with pytest.raises(UnsupportedError, match="6912 source tokens of a 96x96 grid"):
        check_token_merging(tmp_path, sd, (96, 96), "tensorrt")  # SD 2.x at 768x768
    with pytest.raises(UnsupportedError, match="down blocks have no attention"):
        check_token_merging(tmp_path, {"down_block_types": ["DownBlock2D"]}, (64, 64), "onnx")
