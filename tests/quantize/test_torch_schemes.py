"""The torch reference backend's weight-only schemes (torchao): int8, int4, nf4 on a tiny ViT.

Each scheme runs on a copy of one fp32 torch artifact, is reopened through `modelkiln.load`
and compared with the fp32 artifact on the same pixels.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkiln import load, open_artifact
from modelkiln.artifact import read_manifest, record_files, write_manifest
from modelkiln.errors import QuantizationError
from modelkiln.quantize.schemes import (
    SCHEMES,
    Int4Weights,
    Int8Dynamic,
    Int8Weights,
    NF4Weights,
    SchemeConfig,
)

pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(
        importlib.util.find_spec("torchao") is None,
        reason="torchao is not installed (pip install 'modelkiln[torch]')",
    ),
]

RECIPE = "modelkiln_vision_model.json"
# Logit cosine against fp32 on _pixels(), measured with torchao 0.18.0 on the tiny ViT
# (hidden 32, group_size 16): int8 0.99998, int4 0.9961 (asymmetric) / 0.9887 (symmetric),
# nf4 0.9830. The floors leave room for other CPUs' rounding, not for a broken scheme.
FLOORS = {
    ("int8-weights", False): 0.9995,
    ("int4-weights", False): 0.99,
    ("int4-weights", True): 0.98,
    ("nf4-weights", False): 0.97,
}


@pytest.fixture(scope="module")
def fp32_artifact(built: Callable[..., Path]) -> Path:
    return built("hf-classifier", "vit-torch-fp32")


@pytest.fixture(scope="module")
def fp32_logits(fp32_artifact: Path) -> np.ndarray:
    with load(fp32_artifact) as pipeline:
        logits: np.ndarray = pipeline.session.run({"pixel_values": _pixels()})["logits"]
    return logits


@pytest.mark.parametrize(("scheme", "symmetric"), list(FLOORS))
def test_scheme_quantizes_every_linear_and_stays_close_to_fp32(
    scheme: str,
    symmetric: bool,
    fp32_artifact: Path,
    fp32_logits: np.ndarray,
    tmp_path: Path,
) -> None:
    settings = _config(scheme, group_size=16, symmetric=symmetric)
    artifact, record = _quantized_copy(fp32_artifact, tmp_path, settings)

    linears = _linear_in_features(fp32_artifact)
    assert len(linears) == 13  # 2 blocks x (q, k, v, out, up, down) + the classifier
    assert record["quantized_weights"] == len(linears)
    assert record["skipped_weights"] == 0
    assert record["library"] == "torchao"
    assert record["memory_bytes_after"] < record["memory_bytes_before"]
    # fp32 stays on disk: only the recipe grows.
    assert 0 < record["bytes_after"] - record["bytes_before"] < 500
    recipe = json.loads((artifact / RECIPE).read_text(encoding="utf-8"))
    assert recipe["quantization"]["scheme"] == scheme
    assert recipe["quantization"]["group_size"] == (None if scheme == "int8-weights" else 16)

    with load(artifact) as pipeline:
        logits = pipeline.session.run({"pixel_values": _pixels()})["logits"]
    assert not np.array_equal(logits, fp32_logits), "quantization must change the numbers"
    assert _cosine(logits, fp32_logits) >= FLOORS[(scheme, symmetric)]


def test_fewer_bits_cost_more_accuracy(
    fp32_artifact: Path, fp32_logits: np.ndarray, tmp_path: Path
) -> None:
    """The schemes really differ: int8 is far closer to fp32 than int4 and nf4."""
    errors = {}
    for scheme in ("int8-weights", "int4-weights", "nf4-weights"):
        settings = _config(scheme, group_size=16)
        artifact, _ = _quantized_copy(fp32_artifact, tmp_path / scheme, settings)
        with load(artifact) as pipeline:
            logits = pipeline.session.run({"pixel_values": _pixels()})["logits"]
        errors[scheme] = float(np.abs(logits - fp32_logits).max())
    assert errors["int8-weights"] * 5 < min(errors["int4-weights"], errors["nf4-weights"])


def test_group_size_that_does_not_divide_a_layer_skips_it(
    fp32_artifact: Path, tmp_path: Path
) -> None:
    settings = Int4Weights(group_size=64)
    _, record = _quantized_copy(fp32_artifact, tmp_path, settings)
    linears = _linear_in_features(fp32_artifact)
    divisible = sum(features % 64 == 0 for features in linears)
    assert divisible == 2  # the two MLP down projections (64 -> 32)
    assert record["quantized_weights"] == divisible
    assert record["skipped_weights"] == len(linears) - divisible


def test_group_size_that_divides_no_layer_raises_and_leaves_the_recipe(
    fp32_artifact: Path, tmp_path: Path
) -> None:
    artifact = tmp_path / "copy"
    shutil.copytree(fp32_artifact, artifact)
    before = (artifact / RECIPE).read_bytes()
    settings = NF4Weights(group_size=48)
    message = (
        r"^no Linear layer has in_features divisible by quantization.group_size 48 "
        r"\(in_features found: 32, 64\); set group_size to a divisor of them, or use "
        r"scheme 'none'$"
    )
    with pytest.raises(QuantizationError, match=message):
        _quantize(artifact, settings)
    assert (artifact / RECIPE).read_bytes() == before


def test_quantizing_twice_or_an_unknown_scheme_raises(fp32_artifact: Path, tmp_path: Path) -> None:
    artifact, _ = _quantized_copy(fp32_artifact, tmp_path, Int8Weights())
    with pytest.raises(QuantizationError, match=r"is already quantized \(int8-weights\)"):
        _quantize(artifact, Int4Weights(group_size=16))
    with pytest.raises(QuantizationError, match=r"no quantization scheme 'int8-dynamic'"):
        _quantize(artifact, Int8Dynamic())


def test_build_with_a_torch_scheme_records_it_and_matches_the_direct_call(
    built: Callable[..., Path], fp32_artifact: Path, tmp_path: Path
) -> None:
    """The builder's path (profile override -> quantize -> validate) gives the same module."""
    artifact = built(
        "hf-classifier",
        "vit-torch-fp32",
        "quantization.scheme=int4-weights",
        "quantization.group_size=16",
        "validation.atol=1.0",
        "validation.min_cosine=0.95",
    )
    (record,) = open_artifact(artifact, verify=True).manifest.components.values()
    assert record.quantization.scheme == "int4-weights"
    assert record.quantization.quantized_weights == 13
    assert record.validation.passed
    settings = Int4Weights(group_size=16)
    direct, _ = _quantized_copy(fp32_artifact, tmp_path, settings)
    with load(artifact) as built_pipeline, load(direct) as direct_pipeline:
        ours = built_pipeline.session.run({"pixel_values": _pixels()})["logits"]
        theirs = direct_pipeline.session.run({"pixel_values": _pixels()})["logits"]
    np.testing.assert_array_equal(ours, theirs)  # deterministic: re-quantized on every load


def _config(scheme: str, **keys: Any) -> SchemeConfig:
    """The scheme's config with those of `keys` it has (as a profile's [quantization] is read)."""
    config = SCHEMES.get(scheme)
    return config(**{k: v for k, v in keys.items() if k in {f.name for f in fields(config)}})


def _quantize(artifact: Path, settings: SchemeConfig) -> dict[str, Any]:
    from modelkiln.quantize.torch import quantize_weights

    return quantize_weights(artifact, settings, ())


def _quantized_copy(
    artifact: Path, tmp_path: Path, settings: SchemeConfig
) -> tuple[Path, dict[str, Any]]:
    """Quantize a copy; re-record its files in kiln.json as the builder's last step does."""
    copy = tmp_path / "quantized"
    shutil.copytree(artifact, copy)
    record = _quantize(copy, settings)
    manifest = read_manifest(copy)
    write_manifest(copy, dataclasses.replace(manifest, files=record_files(copy)))
    return copy, record


def _linear_in_features(artifact: Path) -> list[int]:
    import torch

    from modelkiln.models import FAMILIES

    recipe = json.loads((artifact / RECIPE).read_text(encoding="utf-8"))
    module = FAMILIES.get("vit").reference_module(artifact, "vision_model", recipe["model"])
    return [m.in_features for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _pixels() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)


def _cosine(ours: np.ndarray, theirs: np.ndarray) -> float:
    norms = np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
    return float(((ours * theirs).sum(1) / norms).min())
