"""Post-export quantization: the support matrix, every bundled quantized ViT profile built on a
tiny model, what the manifest records, and the errors."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkiln import build, load, open_artifact
from modelkiln.errors import QuantizationError, UnsupportedError
from modelkiln.plan import load_profile
from modelkiln.profiles import bundled_profile_names
from modelkiln.quantize import known_schemes, matrix_markdown, support, supported_schemes

pytestmark = pytest.mark.torch

# The tiny ViT's hidden size is 32: int4/nf4 groups must divide it.
SMALL_GROUPS = ("quantization.group_size=16",)
CALIBRATE = ('calibration.data="digits"', "calibration.size=16", "calibration.batch_size=4")
ORT, OV = pytest.mark.onnxruntime, pytest.mark.openvino
TRT = [pytest.mark.tensorrt, pytest.mark.gpu]
QUANTIZED = [
    pytest.param("vit-onnxruntime-int8", (), "int8-dynamic", marks=ORT),
    pytest.param("vit-onnxruntime-int8-static", CALIBRATE, "int8-static", marks=ORT),
    pytest.param("vit-onnxruntime-int4", SMALL_GROUPS, "int4-weights", marks=ORT),
    pytest.param("vit-onnxruntime-nf4", SMALL_GROUPS, "nf4-weights", marks=ORT),
    pytest.param("vit-openvino-int8", (), "int8-weights", marks=OV),
    pytest.param("vit-openvino-int8-static", CALIBRATE, "int8-static", marks=OV),
    pytest.param("vit-openvino-int4", SMALL_GROUPS, "int4-weights", marks=OV),
    pytest.param("vit-openvino-nf4", SMALL_GROUPS, "nf4-weights", marks=OV),
    pytest.param("vit-torch-int8", (), "int8-weights"),
    pytest.param("vit-torch-int4", SMALL_GROUPS, "int4-weights"),
    pytest.param("vit-torch-nf4", SMALL_GROUPS, "nf4-weights"),
    pytest.param("vit-tensorrt-int8", CALIBRATE, "int8-static", marks=TRT),
    pytest.param("vit-executorch-int8", CALIBRATE, "int8-static", marks=pytest.mark.executorch),
    # Groups of 32 (the profile's) divide the tiny ViT's widths; XNNPACK takes no smaller.
    pytest.param("vit-executorch-int4", (), "int4-weights", marks=pytest.mark.executorch),
]
# Tiny model, random weights: 4-bit groups of 16 cost a few hundredths of cosine.
COSINE_FLOOR = {"int8": 0.99, "int4": 0.97, "nf4": 0.97}
FP32 = {
    "onnxruntime": "vit-onnxruntime-fp32",
    "openvino": "vit-openvino-fp32",
    "tensorrt": "vit-onnxruntime-fp32",  # the fp32 reference runs on the CPU
    "torch": "vit-torch-fp32",
    "executorch": "vit-executorch-fp32",
}


# Tiny diffusion pipelines: one calibration prompt, short runs.
TINY_RUNS = (
    "calibration.size=1",
    "calibration.steps=2",
    'validation.prompts=["a red fox in a forest"]',
    "validation.steps=2",
)
DIFFUSION = [
    pytest.param("sd", "sd-openvino-int8", marks=[OV, pytest.mark.slow]),
    pytest.param("sd", "sd-openvino-int8-hybrid", marks=[OV, pytest.mark.slow]),
    # sd-openvino-int8 with few-step [generation] defaults: its gate runs LCM's 4 steps.
    pytest.param("sd", "sd-lcm-openvino-int8", marks=[OV, pytest.mark.slow]),
    pytest.param("sdxl", "sdxl-openvino-int8-hybrid", marks=[OV, pytest.mark.slow]),
    pytest.param("sd", "sd-executorch-int8", marks=[pytest.mark.executorch, pytest.mark.slow]),
]


def _quantized(name: str) -> bool:
    profile = load_profile(name)
    return profile.quantization.scheme != "none" or bool(profile.schemes())


# Families whose quantized profiles their own test files build and generate with.
TESTED_BESIDE_THEIR_FAMILY = {
    "sd3": ("tests/models/test_sd3.py", "tests/models/test_by_block.py"),
    "flux": ("tests/models/test_flux.py",),
}


def test_every_quantized_bundled_profile_is_tested_here() -> None:
    # Core ML's run only on macOS: tests/exporters/test_coreml.py checks their programs.
    bundled = {
        n
        for n in bundled_profile_names()
        if _quantized(n)
        and load_profile(n).export.format != "coreml"
        and load_profile(n).family not in TESTED_BESIDE_THEIR_FAMILY
    }
    assert bundled == {p.values[0] for p in QUANTIZED} | {p.values[1] for p in DIFFUSION}
    root = Path(__file__).parents[2]
    for family, paths in TESTED_BESIDE_THEIR_FAMILY.items():
        text = "".join((root / path).read_text(encoding="utf-8") for path in paths)
        for name in bundled_profile_names():
            if name.startswith(f"{family}-") and _quantized(name):
                assert f'"{name}"' in text, f"{name} is not tested in {' or '.join(paths)}"


@pytest.mark.parametrize(("source", "profile"), DIFFUSION)
def test_quantized_diffusion_build_passes_its_end_to_end_gate(
    source: str, profile: str, built: Callable[..., Path]
) -> None:
    artifact = built(source, profile, *TINY_RUNS)
    manifest = open_artifact(artifact, verify=True).manifest
    settings = load_profile(profile)
    for name, record in manifest.components.items():
        scheme = settings.for_component(name).quantization.scheme
        assert record.quantization.scheme == scheme
        assert record.quantization.bytes_after < record.quantization.bytes_before
        if settings.export.format == "executorch":
            # The program holds the quantized Linears; XNNPACK runs them in int8.
            assert record.runtime["inference_precision"] == "int8"
            assert record.quantization.quantized_weights > 0
            continue
        import openvino as ov

        model = ov.Core().read_model(artifact / record.entry)
        fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
        # Hybrid: the UNet's activations are quantized too; weight-only leaves none.
        assert (fake_quantize > 0) == (scheme == "int8-hybrid")
        if scheme == "int8-hybrid":
            assert record.validation.inputs.endswith(" of the calibration feeds")
            assert record.quantization.details["calibration_batches"] >= 2  # one per denoising step
    end_to_end = manifest.end_to_end
    assert end_to_end is not None and end_to_end.prompts == ("a red fox in a forest",)
    # The images changed (not identical) but stay within the profile's bounds.
    (psnr,) = end_to_end.psnr_db
    (ssim,) = end_to_end.ssim
    assert psnr is not None and settings.validation.min_psnr_db <= psnr < 80
    assert settings.validation.min_ssim <= ssim < 1.0


@pytest.mark.parametrize(("profile", "overrides", "scheme"), QUANTIZED)
def test_quantized_build_records_what_it_did_and_stays_close_to_torch(
    profile: str,
    overrides: tuple[str, ...],
    scheme: str,
    built: Callable[..., Path],
    rgb_images: list[np.ndarray],
) -> None:
    fp32_profile = FP32[profile.split("-")[1]]
    artifact = built("hf-classifier", profile, *overrides)
    (record,) = open_artifact(artifact, verify=True).manifest.components.values()
    quantization = record.quantization
    assert quantization is not None and quantization.scheme == scheme
    # 2 blocks x 6 linears; ONNX Runtime's fused attention packs Q, K and V into one weight.
    assert quantization.quantized_weights >= (8 if scheme == "int8-dynamic" else 12)
    # The torch format keeps fp32 files and quantizes when it opens: its memory shrinks.
    size = "memory_bytes" if profile.startswith("vit-torch") else "bytes"
    assert getattr(quantization, f"{size}_after") < getattr(quantization, f"{size}_before")
    assert record.validation.passed
    floor = COSINE_FLOOR[scheme.split("-")[0]]
    assert record.validation.outputs["logits"].min_cosine >= floor
    with load(artifact) as quantized, load(built("hf-classifier", fp32_profile)) as reference:
        pixels = _real_pixels(reference)
        ours = quantized.session.run({"pixel_values": pixels})["logits"]
        theirs = reference.session.run({"pixel_values": pixels})["logits"]
        assert [p[0].index for p in quantized(rgb_images)] == [
            p[0].index for p in reference(rgb_images)
        ]
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= floor
    assert not np.array_equal(ours, theirs), "quantization must change the numbers"


@pytest.mark.onnxruntime
def test_onnx_int8_dynamic_uses_integer_kernels(built: Callable[..., Path]) -> None:
    import onnx

    artifact = built("hf-classifier", "vit-onnxruntime-int8")
    model = onnx.load(str(artifact / "model.onnx"))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["MatMulInteger"] >= 7 and ops["DynamicQuantizeLinear"] >= 1
    # The export fused each attention (onnx_fusions.py): int8 Q/K/V projection inside QAttention,
    # and no float MatMul is left.
    assert ops["QAttention"] == 2 and ops["MatMul"] == 0
    (record,) = open_artifact(artifact).manifest.components.values()
    assert record.quantization.details["ops"]["MatMulInteger"] == ops["MatMulInteger"]
    assert record.quantization.details["ops"]["QAttention"] == 2


@pytest.mark.openvino
@pytest.mark.parametrize(
    ("profile", "overrides", "weight_type"),
    [
        ("vit-openvino-int8", (), "u8"),
        ("vit-openvino-int4", SMALL_GROUPS, "i4"),
        ("vit-openvino-nf4", SMALL_GROUPS, "nf4"),
    ],
)
def test_openvino_ir_stores_low_precision_weights(
    profile: str, overrides: tuple[str, ...], weight_type: str, built: Callable[..., Path]
) -> None:
    import openvino as ov

    artifact = built("hf-classifier", profile, *overrides)
    model = ov.Core().read_model(artifact / "openvino_model.xml")
    types = Counter(
        op.get_element_type().get_type_name()
        for op in model.get_ops()
        if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) >= 2
    )
    assert types[weight_type] >= 12
    (record,) = open_artifact(artifact).manifest.components.values()
    assert record.quantization.details["weight_types"][weight_type] >= 12


def test_support_matrix_is_the_one_place(tmp_path: Path) -> None:
    assert supported_schemes("onnx") == [
        "none",
        "int8-dynamic",
        "int8-static",
        "int4-weights",
        "nf4-weights",
    ]
    assert supported_schemes("torch") == ["none", "int8-weights", "int4-weights", "nf4-weights"]
    assert supported_schemes("tensorrt") == ["none", "int8-static", "int4-weights"]
    assert supported_schemes("coreml") == [
        "none",
        "int8-weights",
        "int4-weights",
        "nf4-weights",
        "palettize4-weights",
    ]
    assert set(known_schemes()) == {
        "none",
        "int8-dynamic",
        "int8-static",
        "int8-hybrid",
        "int8-weights",
        "int4-weights",
        "nf4-weights",
        "palettize4-weights",
    }
    table = matrix_markdown()
    for scheme in known_schemes()[1:]:
        row = next(line for line in table.splitlines() if f"`{scheme}`" in line)
        assert row.count("yes") == sum(scheme in schemes for schemes in support().values())


@pytest.mark.parametrize(
    ("profile", "overrides", "message"),
    [
        (
            "vit-onnxruntime-fp32",
            ["quantization.scheme=int8-weights"],
            "format 'onnx' has no quantization scheme 'int8-weights'; for onnx: none, "
            "int8-dynamic, int8-static, int4-weights, nf4-weights; 'int8-weights' is available "
            "for: openvino, coreml, torch",
        ),
        (
            "vit-torch-fp32",
            ["quantization.scheme=int8-static"],
            "format 'torch' has no quantization scheme 'int8-static'; for torch: none, "
            "int8-weights, int4-weights, nf4-weights; 'int8-static' is available for: onnx, "
            "openvino, tensorrt",
        ),
        (
            "vit-onnxruntime-fp32",
            ["quantization.scheme=int8-hybrid"],
            "'int8-hybrid' is available for: openvino",
        ),
        (
            "vit-openvino-fp32",
            ["quantization.scheme=int3"],
            "quantization.scheme 'int3' is unknown; known: none, int8-weights, int8-dynamic,",
        ),
        (
            "vit-onnxruntime-fp16",
            ["quantization.scheme=int8-dynamic"],
            "onnx quantization schemes start from fp32 weights, not fp16",
        ),
        (
            "vit-onnxruntime-fp32",
            ["precision.compute=fp16"],
            "runtime 'onnxruntime' computes in the precision the weights are stored in",
        ),
    ],
)
def test_unsupported_pairs_fail_at_profile_validation(
    profile: str, overrides: list[str], message: str
) -> None:
    with pytest.raises(UnsupportedError, match=re.escape(message)):
        load_profile(profile, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quantization.group_size=0"], "quantization.group_size must be >= 1, got 0"),
        (["quantization.ratio=0"], r"quantization.ratio must be in \(0, 1\], got 0"),
        (
            [
                "export.format=onnx",
                "runtime.name=onnxruntime",
                "precision.compute=fp32",
                "quantization.group_size=48",
            ],
            "onnxruntime's 4-bit kernels take quantization.group_size in 16, 32, 64, 128, 256, "
            "got 48",
        ),
    ],
)
def test_bad_quantization_settings(overrides: list[str], message: str) -> None:
    with pytest.raises(Exception, match=message):
        load_profile("vit-openvino-int4", overrides)


@pytest.mark.openvino
def test_group_size_that_does_not_divide_the_layers_fails_the_build(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    target = tmp_path / "int4"
    with pytest.raises(
        QuantizationError,
        match=r"^vision_model: nncf int4_sym weight compression failed: .*group size.*; "
        r"quantization\.group_size = 128 must divide the input channels of every layer",
    ):
        build(source_dir("hf-classifier"), "vit-openvino-int4", target)
    assert not target.exists()


def _real_pixels(pipeline: Any) -> np.ndarray:
    """Held-out digits as the artifact preprocesses them: the calibrated schemes took their
    activation ranges from the training digits and clip what lies far outside them."""
    from modelkiln import digits

    return pipeline.preprocessor(digits.to_pil(digits.load_split().test_images[:8]))


def test_the_docs_show_the_matrix_from_code() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "quantization.md"
    assert matrix_markdown() in docs.read_text(encoding="utf-8")


@pytest.mark.openvino
def test_fewer_calibration_images_than_a_batch_still_calibrate(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """3 images, calibration batches of 8: a dynamic batch calibrates on one batch of 3 (it
    used to make no batch and blame a missing calibration.data); a static batch of 4 cannot
    be filled and says so."""
    from PIL import Image

    from modelkiln.errors import InputError

    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        pixels = np.random.default_rng(index).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    data = f'calibration.data="{folder}"'
    artifact = build(
        source_dir("hf-classifier"), "vit-openvino-int8-static", tmp_path / "dynamic",
        overrides=[data, "calibration.batch_size=8"],
    )  # fmt: skip
    record = open_artifact(artifact).manifest.components["vision_model"].quantization
    assert record is not None and record.details["calibration_batches"] == 1
    static = [
        data,
        "shapes.dynamic_batch=false",
        "shapes.batch_size=4",
        "validation.batch_sizes=[4]",
    ]
    with pytest.raises(InputError, match=r"has 3 image\(s\), fewer than the static export's"):
        build(
            source_dir("hf-classifier"),
            "vit-openvino-int8-static",
            tmp_path / "s",
            overrides=static,
        )
