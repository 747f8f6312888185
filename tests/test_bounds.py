"""NaN, negative and huge values are refused where they enter, with one line each: a gate fed
NaN compares false both ways and would pass, and a huge value runs for hours instead of
failing."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from modelkiln import load
from modelkiln.bench.settings import BenchSettings
from modelkiln.cli import cli
from modelkiln.errors import InputError, ProfileError
from modelkiln.plan import load_profile


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["validation.atol=nan"], r"validation\.atol must be a finite number, got nan"),
        (["validation.min_sqnr_db=nan"], r"validation\.min_sqnr_db must be a finite number"),
        (["validation.min_cosine=inf"], r"validation\.min_cosine must be a finite number"),
        (["validation.max_accuracy_drop=-inf", 'validation.data="digits"'], r"finite number"),
        (["components.vision_model.atol=nan"], r"components\.vision_model\.atol must be a finite"),
        (["quantization.scheme=int4-weights", "quantization.ratio=nan"], r"ratio must be a finite"),
        (["runtime.threads=-4"], r"runtime\.threads must be in 1\.\.4096, got -4"),
        (["validation.steps=100000000"], r"validation\.steps must be in 1\.\.1000"),
        (["calibration.size=-1"], r"calibration\.size must be in 1\.\.100000, got -1"),
        (["shapes.max_batch_size=1000000"], r"shapes\.max_batch_size must be in 1\.\.4096"),
        (["shapes.height=1048576"], r"shapes\.height must be a multiple of 8 in 8\.\.16384"),
        (["validation.batch_sizes=[1, 100000]"], r"validation\.batch_sizes must be .* 1\.\.4096"),
    ],
)
def test_profile_values_must_be_finite_and_in_range(overrides: list[str], message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        load_profile("vit-openvino-int8", overrides)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"duration_s": math.nan}, r"--duration must be in \(0, 86400\] seconds, got nan"),
        ({"duration_s": 1e12}, r"--duration must be in"),
        ({"runs": 10**9}, r"runs must be in 1\.\.1000000"),
        ({"warmup": -1}, r"warmup must be in 0\.\.1000000"),
        ({"batch_sizes": (1, 10**6)}, r"batch sizes must be in 1\.\.4096"),
        ({"steps": 10**8}, r"steps must be in 1\.\.1000"),
    ],
)
def test_bench_settings_are_bounded(settings: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        BenchSettings(**settings)  # type: ignore[arg-type]


@pytest.mark.onnxruntime
def test_runtime_and_image_bounds(built: Callable[..., Path]) -> None:
    artifact = built("hf-classifier", "vit-onnxruntime-fp32")
    with pytest.raises(InputError, match=r"threads must be a whole number >= 1, got -1"):
        load(artifact, threads=-1)
    runner = CliRunner()
    options = (["--threads", "-1"], ["--max-pixels", "-5"], ["--batch-size", "0"], ["-k", "0"])
    for option in options:
        result = runner.invoke(cli, ["classify", str(artifact), "x.png", *option])
        assert result.exit_code == 2, result.output  # a usage error, before anything loads
        assert "is not in the range" in result.output


@pytest.mark.torch
@pytest.mark.onnxruntime
@pytest.mark.parametrize(
    ("option", "code", "message"),
    [
        # Counts are click ranges: a usage error before the artifact loads.
        (["--steps", "100000000"], 2, "100000000 is not in the range 1<=x<=1000"),
        (["--num-images", "100000"], 2, "100000 is not in the range 1<=x<=64"),
        (["--guidance", "nan"], 1, "guidance must be a number in 0..100.0, got nan"),
        (["--width", "1048576"], 1, "width must be a positive multiple of 8 up to 16384"),
        (["-o", "out.xyz"], 1, "cannot write an image as 'out.xyz': unknown image type '.xyz'"),
    ],
)
def test_generation_bounds_fail_before_any_step(
    built: Callable[..., Path], tmp_path: Path, option: list[str], code: int, message: str
) -> None:
    artifact = built("sd", "sd-onnxruntime-fp32")
    out = tmp_path / "out.png"
    result = CliRunner().invoke(
        cli, ["generate", str(artifact), "--prompt", "a", "-o", out, *option]
    )
    assert result.exit_code == code
    assert message in (result.output if code == 2 else str(result.exception))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.torch
@pytest.mark.onnxruntime
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"steps": 100_000_000}, "steps must be in 1..1000, got 100000000"),
        ({"num_images": 100_000}, "num_images must be in 1..64 per prompt, got 100000"),
    ],
)
def test_the_pipeline_bounds_the_same_counts(
    built: Callable[..., Path], settings: dict[str, int], message: str
) -> None:
    with load(built("sd", "sd-onnxruntime-fp32")) as pipeline, pytest.raises(InputError) as caught:
        pipeline.text_to_image("a", **settings)
    assert message in str(caught.value)
