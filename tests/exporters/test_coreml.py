"""Core ML: conversion of every component, compression seen in the saved program, the runtime's
refusal off macOS, and the deferred validation (`kiln validate`) that a Mac runs."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from modelkiln import load, open_artifact
from modelkiln.cli import cli
from modelkiln.errors import UnsupportedError
from modelkiln.evaluation.components import load_reference
from modelkiln.plan import load_profile
from modelkiln.quantize.coreml import NF4_LEVELS, nf4_table
from modelkiln.runtimes.coreml import CoreMLSettings

pytestmark = [pytest.mark.torch, pytest.mark.coreml]

off_macos = pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")


def _program(artifact: Path, component: str = "vision_model") -> Any:
    from modelkiln.runtimes.coreml import import_coremltools

    ct = import_coremltools()
    entry = artifact / open_artifact(artifact).manifest.components[component].entry
    return ct.models.MLModel(str(entry), skip_model_load=True)


def _inputs(model: Any) -> dict[str, tuple[list[int], list[tuple[int, int]], int]]:
    """name -> (default shape, (lower, upper) of each dim of a range shape, data type code)."""
    result = {}
    for feature in model.get_spec().description.input:
        array = feature.type.multiArrayType
        ranges = [(r.lowerBound, r.upperBound) for r in array.shapeRange.sizeRanges]
        result[feature.name] = (list(array.shape), ranges, array.dataType)
    return result


def _enumerated(model: Any, name: str) -> list[list[int]]:
    """The shapes an input with enumerated flexible shapes takes."""
    feature = next(f for f in model.get_spec().description.input if f.name == name)
    return [list(shape.shape) for shape in feature.type.multiArrayType.enumeratedShapes.shapes]


def _ops(model: Any) -> dict[str, int]:
    from modelkiln.quantize.coreml import compressed_ops

    return dict(compressed_ops(model))


FLOAT32 = 65568  # ArrayFeatureType.FLOAT32
INT32 = 131104  # ArrayFeatureType.INT32


def test_vit_converts_with_a_flexible_batch_and_keeps_its_torch_reference(
    built: Callable[..., Path], source_dir: Callable[[str], Path]
) -> None:
    artifact = built("hf-classifier", "vit-coreml-fp16")
    model = _program(artifact)
    # Enumerated shapes by default (what the Neural Engine runs): batch 1, 2, 4, 8, 16.
    expected = [[b, 3, 32, 32] for b in (1, 2, 4, 8, 16)]
    assert sorted(_enumerated(model, "pixel_values")) == expected
    assert _inputs(model)["pixel_values"][0] == [1, 3, 32, 32]
    assert _inputs(model)["pixel_values"][2] == FLOAT32
    assert [o.name for o in model.get_spec().description.output] == ["logits"]
    assert model.user_defined_metadata["modelkiln.target"] == "iOS17"
    # fp16 compute: the program casts its fp32 input to fp16 and its weights are fp16.
    ops = _ops(model)
    assert ops["cast"] >= 2 and ops["linear"] >= 8

    manifest = open_artifact(artifact).manifest
    record = manifest.components["vision_model"]
    assert record.entry == "model.mlpackage"
    assert record.validation.passed is None
    if sys.platform != "darwin":
        assert "needs macOS" in record.validation.not_run
    # The torch outputs for the validation feeds travel with the artifact.
    feeds, expected = load_reference(artifact / record.validation.reference)
    assert [f["pixel_values"].shape for f in feeds] == [(1, 3, 32, 32), (4, 3, 32, 32)]
    assert [e["logits"].shape for e in expected] == [(1, 10), (4, 10)]
    assert record.validation.tolerance.atol == 5e-2
    import torch
    from transformers import ViTForImageClassification

    torch_model = ViTForImageClassification.from_pretrained(source_dir("hf-classifier")).eval()
    with torch.no_grad():
        logits = torch_model(torch.from_numpy(feeds[1]["pixel_values"])).logits.numpy()
    np.testing.assert_allclose(expected[1]["logits"], logits, atol=1e-5)
    assert manifest.profile.section("coreml") == {
        "target": "iOS17",
        "compute_units": "all",
        "flexible_shapes": "enumerated",
    }
    assert (artifact / "config.json").is_file()


def test_deferred_validation_applies_the_build_tolerance(built: Callable[..., Path]) -> None:
    """What `kiln validate` does on a Mac, with a stand-in for the Core ML session."""
    from modelkiln.errors import ValidationError
    from modelkiln.evaluation.components import check_pending
    from modelkiln.runtimes.base import Session

    artifact = built("hf-classifier", "vit-coreml-fp16")
    record = open_artifact(artifact).manifest.components["vision_model"]
    _, expected = load_reference(artifact / record.validation.reference)

    class Replay(Session):
        """Returns the torch outputs scaled and shifted, as a program that far off would."""

        def __init__(self, scale: float, shift: float) -> None:
            super().__init__("vision_model", record.inputs, record.outputs)
            self.scale, self.shift, self.calls = scale, shift, 0

        def _run(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
            reference = expected[self.calls]
            self.calls += 1
            return {name: reference[name] * self.scale + self.shift for name in names}

    result = check_pending(Replay(1.001, 0.0), record.validation, artifact)
    assert result.passed is True
    largest = max(float(np.abs(e["logits"]).max()) for e in expected)
    assert result.outputs["logits"].max_abs == pytest.approx(1e-3 * largest, rel=1e-3)
    with pytest.raises(ValidationError, match=r"max-abs diff 0\.06 > atol 0\.05"):
        check_pending(Replay(1.0, 0.06), record.validation, artifact)


def test_timm_vit_converts_with_a_batch_range(built: Callable[..., Path]) -> None:
    artifact = built("timm-classifier", "vit-coreml-fp16", "coreml.flexible_shapes=range")
    ranges = _inputs(_program(artifact))["pixel_values"][1]
    assert ranges == [(1, 16), (3, 3), (32, 32), (32, 32)]


# SD's build is the one with flexible resolution below: one build serves both tests.
FLEXIBLE = {"sd": ("shapes.dynamic_resolution=true",), "sdxl": ()}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["sd", "sdxl"])
def test_every_diffusion_component_converts(built: Callable[..., Path], source: str) -> None:
    artifact = built(source, f"{source}-coreml-fp16", *FLEXIBLE[source])
    manifest = open_artifact(artifact).manifest
    text_encoders = ["text_encoder"] + (["text_encoder_2"] if source == "sdxl" else [])
    assert list(manifest.components) == [*text_encoders, "unet", "vae_encoder", "vae_decoder"]
    for name in text_encoders:
        # CLIP's aten.alias is gone (coremltools has no converter for it); ids are int32.
        ids = _inputs(_program(artifact, name))["input_ids"]
        assert ids[0] == [1, 77] and ids[2] == INT32
    unet = _inputs(_program(artifact, "unet"))
    # The CFG pair at a fixed batch; the 0-d timestep as (1,).
    assert unet["sample"][0][0] == 2 and unet["timestep"][0] == [1]
    for record in manifest.components.values():
        assert record.validation.passed is None and record.validation.reference


FLOW = [
    pytest.param("sd3", "sd3-coreml-fp16", (), id="sd3"),
    pytest.param(
        "flux-dev", "flux-coreml-fp16", ("shapes.height=32", "shapes.width=32"), id="flux"
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("source", "profile", "overrides"), FLOW)
def test_every_flow_transformer_component_converts(
    built: Callable[..., Path], source: str, profile: str, overrides: tuple[str, ...]
) -> None:
    """T5 too: its attention mask's where(cond, x, scalar) is rewritten for coremltools."""
    artifact = built(source, profile, *overrides)
    manifest = open_artifact(artifact).manifest
    sd3 = source == "sd3"
    t5, tokens = ("text_encoder_3", 256) if sd3 else ("text_encoder_2", 512)
    ids = _inputs(_program(artifact, t5))["input_ids"]
    assert ids[0] == [1, tokens] and ids[2] == INT32
    transformer = _inputs(_program(artifact, "transformer"))
    # SD3's transformer takes the CFG pair at its fixed batch; Flux runs without CFG.
    assert transformer["hidden_states"][0][0] == (2 if sd3 else 1)
    assert "guidance" in transformer or sd3
    for record in manifest.components.values():
        assert record.validation.passed is None and record.validation.reference


@pytest.mark.slow
def test_diffusion_resolution_can_be_flexible(built: Callable[..., Path]) -> None:
    artifact = built("sd", "sd-coreml-fp16", *FLEXIBLE["sd"])
    # Enumerated: 8, 16 and 32 latents (half, the set size, twice) in both dims.
    latents = [[2, 4, h, w] for h in (8, 16, 32) for w in (8, 16, 32)]
    assert sorted(_enumerated(_program(artifact, "unet"), "sample")) == latents
    ranged = "coreml.flexible_shapes=range"
    artifact = built("sd", "sd-coreml-fp16", *FLEXIBLE["sd"], ranged)
    sample = _inputs(_program(artifact, "unet"))["sample"]
    # The tiny model: 32 pixels, 16x16 latents; half to twice that, on strides of 8.
    assert sample[0] == [2, 4, 16, 16]
    assert sample[1] == [(2, 2), (4, 4), (8, 32), (8, 32)]
    pixels = _inputs(_program(artifact, "vae_encoder"))["sample"]
    assert pixels[1] == [(1, 1), (3, 3), (16, 64), (16, 64)]


COMPRESSED = [
    ("vit-coreml-int8", "constexpr_affine_dequantize", 0.6),  # iOS17's int8 op
    ("vit-coreml-int4", "constexpr_blockwise_shift_scale", 0.5),  # iOS18's int4 op
    ("vit-coreml-nf4", "constexpr_lut_to_dense", 0.4),
    ("vit-coreml-palettize4", "constexpr_lut_to_dense", 0.4),
]


def test_every_compressed_coreml_profile_is_tested_here() -> None:
    from modelkiln.profiles import bundled_profile_names

    bundled = {
        name
        for name in bundled_profile_names()
        if load_profile(name).export.format == "coreml"
        and load_profile(name).quantization.scheme != "none"
    }
    assert bundled == {profile for profile, _, _ in COMPRESSED}


@pytest.mark.parametrize(("profile", "op", "smaller_than"), COMPRESSED)
def test_compression_is_in_the_saved_program(
    built: Callable[..., Path], profile: str, op: str, smaller_than: float
) -> None:
    artifact = built("hf-classifier-64", profile)
    record = open_artifact(artifact).manifest.components["vision_model"].quantization
    ops = _ops(_program(artifact))
    # hidden 64: every linear weight (12 of them) is above coremltools' 2048-element threshold;
    # int4's block of 32 input channels does not divide the patch embedding's 3 channels.
    expected = 12 if profile == "vit-coreml-int4" else 13
    assert record is not None and ops.get(op) == expected == record.quantized_weights
    assert record.details["ops"] == {op: expected}
    assert record.bytes_after < smaller_than * record.bytes_before


def test_int4_weights_are_stored_in_four_bits(built: Callable[..., Path]) -> None:
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil
    from coremltools.converters.mil.mil import types

    model = _program(built("hf-classifier-64", "vit-coreml-int4"))
    spec = model.get_spec()
    program = load_mil(
        spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir
    )
    ops = [op for op in program.functions["main"].operations if op.op_type.startswith("constexpr")]
    assert len(ops) == 12
    for op in ops:
        data, scale = op.inputs["data"], op.inputs["scale"]
        assert types.builtin_to_string(data.dtype) == "int4"
        assert data.val.min() >= -8 and data.val.max() <= 7
        # symmetric: no offset; one fp16 scale per 32 input channels of each output channel
        assert "offset" not in op.inputs
        assert scale.val.dtype == np.float16
        assert scale.val.shape == (data.val.shape[0], data.val.shape[1] // 32)


def test_nf4_table_is_the_normal_float_levels_scaled_by_absmax() -> None:
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((16, 64)) * 0.02).astype(np.float16)
    table, indices = nf4_table(weights)
    absmax = float(np.abs(weights).max())
    np.testing.assert_allclose(table, NF4_LEVELS * absmax, rtol=1e-3)
    assert indices.dtype == np.uint8 and indices.shape == weights.shape
    # every weight maps to its nearest level
    nearest = np.abs(weights[..., None] - table).argmin(-1)
    np.testing.assert_array_equal(indices, nearest)
    assert np.abs(table[indices] - weights).max() <= absmax * 0.17  # half the widest NF4 gap


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quantization.scheme=int4-weights"], "from iOS18 / macOS15"),
        (["quantization.scheme=nf4-weights", "coreml.target=macOS14"], "not macOS14"),
        (["quantization.scheme=int8-static"], "needs macOS: use int8-weights"),
        (["precision.compute=fp32"], "compute (fp32) must equal weights (fp16)"),
        (["precision.weights=bf16", "precision.compute=bf16"], "cannot store weights in bf16"),
        (["shapes.max_batch_size=2"], "exceed shapes.max_batch_size = 2"),
    ],
)
def test_impossible_vit_profiles_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises((UnsupportedError, ValueError), match=re.escape(message)):
        load_profile("vit-coreml-fp16", overrides)


def test_a_flexible_diffusion_batch_is_refused() -> None:
    with pytest.raises(UnsupportedError, match=r"set shapes\.dynamic_batch = false"):
        load_profile("sd-coreml-fp16", ["shapes.dynamic_batch=true"])


@off_macos
def test_running_off_macos_names_the_platform(built: Callable[..., Path]) -> None:
    artifact = built("hf-classifier", "vit-coreml-fp16")
    with pytest.raises(UnsupportedError, match=r"Core ML prediction needs macOS 13\+"):
        load(artifact)
    result = CliRunner().invoke(cli, ["validate", str(artifact)])
    assert result.exit_code == 1  # the click group passes the KilnError through, typed
    assert isinstance(result.exception, UnsupportedError)
    assert "needs macOS 13+" in str(result.exception)
    info = CliRunner().invoke(cli, ["info", str(artifact)], env={"COLUMNS": "200"})
    assert "not run: Core ML prediction needs macOS" in info.output


def test_bundle_for_ios_carries_the_package_and_the_deployment_target(
    built: Callable[..., Path], tmp_path: Path
) -> None:
    from modelkiln.packaging import package

    artifact = built("hf-classifier-64", "vit-coreml-nf4")
    bundle = package(artifact, "ios", tmp_path / "vit.zip")
    assert bundle.manifest.requirements == ("iOS>=18",)
    names = set(bundle.manifest.files)
    assert "model.mlpackage/Manifest.json" in names
    assert "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin" in names
    assert not any(name.startswith("validation/") for name in names)
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "vit.zip")])
    assert result.exit_code == 0, result.output


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
@pytest.mark.parametrize("profile", ["vit-coreml-fp16", "vit-coreml-int8"])
def test_on_macos_the_program_matches_torch(built: Callable[..., Path], profile: str) -> None:
    artifact = built("hf-classifier-64", profile)
    result = CliRunner().invoke(cli, ["validate", str(artifact)])
    assert result.exit_code == 0, result.output
    images = list(np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
    logits = load(artifact).logits(images)
    reference = load(built("hf-classifier-64", "vit-torch-fp32")).logits(images)
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
    np.testing.assert_allclose(logits, reference, atol=0.1)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
@pytest.mark.parametrize(
    ("source", "family", "overrides"),
    [
        ("sd", "sd", ()),
        ("sd3", "sd3", ()),
        ("flux-dev", "flux", ("shapes.height=32", "shapes.width=32")),
    ],
)
def test_on_macos_the_diffusion_pipeline_runs_on_core_ml(
    built: Callable[..., Path], source: str, family: str, overrides: tuple[str, ...]
) -> None:
    artifact = built(source, f"{family}-coreml-fp16", *overrides)
    images = load(artifact).text_to_image("a red fox", steps=2, seed=0)
    torch_artifact = built(source, f"{family}-torch-fp32", *overrides)
    reference = load(torch_artifact).text_to_image("a red fox", steps=2, seed=0)
    pixels, expected = (np.asarray(i[0], dtype=np.float64) for i in (images, reference))
    assert pixels.shape == expected.shape
    assert np.abs(pixels - expected).mean() < 8  # fp16 over two steps, in 0-255 levels


def test_manifest_records_compute_units_for_the_runtime(built: Callable[..., Path]) -> None:
    artifact = built("hf-classifier", "vit-coreml-fp16", "coreml.compute_units=cpu_and_ne")
    manifest = json.loads((artifact / "kiln.json").read_text())
    assert manifest["profile"]["coreml"]["compute_units"] == "cpu_and_ne"
    options = open_artifact(artifact).runtime_options("vision_model")
    assert options.backend(CoreMLSettings).compute_units == "cpu_and_ne"
