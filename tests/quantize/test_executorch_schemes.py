"""The executorch format's int4-weights (torchao's 8da4w lowered to XNNPACK's blockwise 4-bit
kernels) on the tiny ViT: what it delegates, records and computes against torch fp32, and the
settings it refuses."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelkiln import build, load, open_artifact
from modelkiln.errors import QuantizationError, UnsupportedError
from modelkiln.plan import load_profile

pytestmark = [pytest.mark.torch, pytest.mark.executorch]

PROFILE = "vit-executorch-int4"
# Measured on the tiny ViT (hidden 32, logits within +-0.17) against torch fp32 on standard
# normal pixels, batches 1 / 3 / 32: logit cosine 0.978-0.989, max-abs 0.022-0.030, SQNR
# 14.3-16.4 dB. Asymmetric int4, whose zero points XNNPACK drops, gave cosine 0.91 and
# max-abs 0.06: the bounds tell the two apart.
MIN_COSINE, MAX_ABS, MIN_SQNR_DB = 0.97, 0.05, 12.0
# The profile's: each group of 32 Linear weights (4 bytes each in fp32) becomes 32 int4 values
# and one bf16 scale in the program.
GROUP_SIZE = 32


def _linear_weights(source: Path) -> tuple[int, int]:
    """(Linear layers, their weights) of the source model."""
    import torch
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(source)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return len(linears), sum(m.weight.numel() for m in linears)


def test_int4_program_is_delegated_smaller_and_close_to_torch(
    built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    artifact = built("hf-classifier", PROFILE)
    (record,) = open_artifact(artifact, verify=True).manifest.components.values()
    quantization = record.quantization
    assert quantization is not None and quantization.scheme == "int4-weights"
    layers, weights = _linear_weights(source_dir("hf-classifier"))
    assert quantization.quantized_weights == layers == 13  # 2 blocks x 6, and the head
    assert quantization.details["group_size"] == GROUP_SIZE
    assert quantization.details["activations"] == "int8, dynamic per token"
    # bytes_after counts each int4 weight as half a byte (torchao holds it in a whole one).
    packed = weights // 2 + 2 * weights // GROUP_SIZE
    assert quantization.bytes_before - quantization.bytes_after == 4 * weights - packed
    assert record.validation.passed
    assert record.validation.outputs["logits"].min_cosine >= MIN_COSINE
    # Every Linear runs in XNNPACK: no matmul and no torchao (de)quantize left portable.
    delegation = json.loads((artifact / "delegation.json").read_text())
    assert delegation["delegated_nodes"] > 0 and delegation["delegated_subgraphs"] > 0
    assert delegation["inference_precision"] == "int8, int4 weights"
    portable = " ".join(delegation["portable_ops"])
    assert not re.search(r"linear|addmm|_mm|bmm|quantize|choose_qparams", portable), portable
    fp32 = built("hf-classifier", "vit-executorch-fp32")
    size, fp32_size = ((a / "model.pte").stat().st_size for a in (artifact, fp32))
    # The tiny ViT's Linear weights are ~half of its fp32 program (the rest: embeddings,
    # LayerNorms, the program's graph); measured 0.64.
    assert size < 0.7 * fp32_size
    with load(artifact) as pipeline, load(built("hf-classifier", "vit-torch-fp32")) as torch32:
        rng = np.random.default_rng(0)
        ours, theirs = [], []
        for batch in (1, 3, 32):  # 32: shapes.max_batch_size
            pixels = {"pixel_values": rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)}
            ours.append(pipeline.session.run(pixels)["logits"])
            theirs.append(torch32.session.run(pixels)["logits"])
    a, b = np.concatenate(ours), np.concatenate(theirs)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= MIN_COSINE
    assert np.abs(a - b).max() <= MAX_ABS
    assert 10 * np.log10((b**2).sum() / ((a - b) ** 2).sum()) >= MIN_SQNR_DB
    # Random weights leave small margins between logits: one flip in 36 is rounding, more is not.
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95
    assert not np.array_equal(a, b), "quantization must change the numbers"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["executorch.partitioner=vulkan"], r"set executorch\.partitioner = 'xnnpack'"),
        (["quantization.ratio=0.8"], r"no int8 share to split.*set quantization\.ratio = 1\.0"),
        (
            ["quantization.symmetric=false"],
            r"no zero point .*set quantization\.symmetric = true",
        ),
        (
            ["quantization.group_size=16"],
            r"multiple of 32 weights, got quantization\.group_size = 16; set "
            r"quantization\.group_size = 32",
        ),
    ],
)
def test_int4_profile_errors_are_one_line_and_name_the_fix(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(UnsupportedError, match=message) as raised:
        load_profile(PROFILE, overrides)
    assert "\n" not in str(raised.value)


def test_a_group_size_that_does_not_divide_a_layer_fails_naming_it(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    # 64 passes the profile check (a multiple of 32) but the tiny ViT's widths are 32 and 64.
    with pytest.raises(
        QuantizationError,
        match=r"Linear '\S*layers\.0\.attention\.q_proj' has in_features 32, which "
        r"quantization\.group_size 64 does not divide; set quantization\.group_size = 32$",
    ):
        build(
            source_dir("hf-classifier"),
            PROFILE,
            tmp_path / "artifact",
            overrides=["quantization.group_size=64"],
        )
    assert not (tmp_path / "artifact").exists()


def test_no_group_size_fits_widths_that_are_not_multiples_of_32() -> None:
    import torch

    from modelkiln.quantize.executorch import torchao_int4_weights
    from modelkiln.quantize.schemes import Int4Weights

    module = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Linear(40, 8))
    with pytest.raises(
        QuantizationError,
        match=r"Linear '1' has in_features 40, .* no multiple of 32 divides every Linear's "
        r"in_features: use scheme 'int8-dynamic'",
    ):
        torchao_int4_weights(module, Int4Weights(group_size=32, symmetric=True))


def test_xnnpack_drops_int4_zero_points_which_is_why_asymmetric_is_refused() -> None:
    """The reason the profile check gives, kept true: if ExecuTorch starts storing zero points
    for grouped int4, this fails and asymmetric weights can be allowed."""
    import copy

    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, MappingType, quantize_
    from torchao.quantization.granularity import PerGroup

    torch.manual_seed(0)
    # Shifted weights: their groups' ranges are far from symmetric, so zero points matter.
    layer = torch.nn.Linear(64, 16)
    with torch.no_grad():
        layer.weight.add_(0.2)
    pixels = torch.randn(4, 64)
    errors = {}
    for mapping in (MappingType.SYMMETRIC, MappingType.ASYMMETRIC):
        module = copy.deepcopy(layer)
        config = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(32), weight_mapping_type=mapping
        )
        quantize_(module, config)
        with torch.no_grad():
            eager = module(pixels)
        program = torch.export.export(module, (pixels,), strict=False)
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        method = Runtime.get().load_program(lowered.to_executorch().buffer).load_method("forward")
        (ran,) = method.execute([pixels])
        errors[mapping] = float((ran - eager).abs().max() / eager.abs().max())
    # Symmetric: the program computes what torchao's module does (bf16 scales, int8 inputs).
    assert errors[MappingType.SYMMETRIC] < 0.02
    assert errors[MappingType.ASYMMETRIC] > 10 * errors[MappingType.SYMMETRIC]
