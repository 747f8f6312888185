"""Every ViT source × format × runtime round-trips: build, validate, load, run, match torch."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelkiln import build, load, open_artifact
from modelkiln.artifact import sha256_file
from modelkiln.errors import UnsupportedError, ValidationError
from modelkiln.images import load_images

pytestmark = pytest.mark.torch

CLASSIFIERS = ("hf-classifier", "timm-classifier")
BACKBONES = ("hf-backbone", "timm-backbone")
SOURCES = CLASSIFIERS + BACKBONES

# (profile, overrides, runtime to load with, marker)
ROUND_TRIPS = [
    pytest.param(
        "vit-onnxruntime-fp32", (), "onnxruntime", marks=pytest.mark.onnxruntime, id="onnx-ort"
    ),
    pytest.param(
        "vit-onnxruntime-fp32",
        (),
        "openvino",
        marks=[pytest.mark.onnxruntime, pytest.mark.openvino],
        id="onnx-ov",
    ),
    pytest.param("vit-openvino-fp32", (), "openvino", marks=pytest.mark.openvino, id="ir-ov"),
    pytest.param(
        "vit-openvino-fp32",
        ("openvino.via=onnx",),
        "openvino",
        marks=[pytest.mark.openvino, pytest.mark.onnxruntime],
        id="ir-via-onnx-ov",
    ),
    pytest.param("vit-openvino-bf16", (), "openvino", marks=pytest.mark.openvino, id="ir-bf16-ov"),
    pytest.param("vit-torch-fp32", (), "torch", id="torch"),
]


def torch_reference(source: str, directory: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The source model run by its own library, independent of modelkiln's wrappers."""
    import torch

    x = torch.from_numpy(pixels)
    with torch.inference_mode():
        if source.startswith("hf"):
            from transformers import ViTForImageClassification, ViTModel

            if source == "hf-classifier":
                return {
                    "logits": ViTForImageClassification.from_pretrained(directory)(
                        pixel_values=x
                    ).logits.numpy()
                }
            out = ViTModel.from_pretrained(directory)(pixel_values=x, output_hidden_states=True)
            return {
                "last_hidden_state": out.last_hidden_state.numpy(),
                "pooler_output": out.pooler_output.numpy(),
                **{f"hidden_state_{k}": out.hidden_states[k].numpy() for k in (1, 2)},
            }
        import timm

        model = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
        if source == "timm-classifier":
            return {"logits": model(x).numpy()}
        features = model.forward_features(x)
        return {
            "last_hidden_state": features.numpy(),
            "pooler_output": model.forward_head(features, pre_logits=True).numpy(),
        }


def assert_close(actual: np.ndarray, expected: np.ndarray, profile: str) -> None:
    assert actual.shape == expected.shape
    if "bf16" in profile:
        a, e = actual.reshape(len(actual), -1), expected.reshape(len(expected), -1)
        cosine = (a * e).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(e, axis=1)
        assert cosine.min() > 0.999
        assert np.abs(actual - expected).max() < 0.05
    else:
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("profile", "overrides", "runtime"), ROUND_TRIPS)
def test_round_trip_matches_torch(
    source: str,
    profile: str,
    overrides: tuple[str, ...],
    runtime: str,
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
    rgb_images: list[np.ndarray],
) -> None:
    artifact = built(source, profile, *overrides)
    pipeline = load(artifact, runtime=runtime)
    pixels = pipeline.preprocessor(load_images(rgb_images))
    expected = torch_reference(source, source_dir(source), pixels)
    with pipeline:
        outputs = pipeline.session.run({"pixel_values": pixels})
    assert set(outputs) == set(pipeline.session.output_specs)
    for name, value in outputs.items():
        assert_close(value, expected[name], profile)
    if source in CLASSIFIERS:
        with load(artifact, runtime=runtime) as classifier:
            predictions = classifier(rgb_images, top_k=3)
        assert [p[0].index for p in predictions] == list(
            expected["logits"].argmax(1)
        ) or "bf16" in profile
        assert all(len(p) == 3 and p[0].score >= p[1].score >= p[2].score for p in predictions)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("profile", "overrides", "runtime"), ROUND_TRIPS)
def test_manifest_records_the_build(
    source: str,
    profile: str,
    overrides: tuple[str, ...],
    runtime: str,
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
) -> None:
    artifact = built(source, profile, *overrides)
    manifest = open_artifact(artifact, verify=True).manifest  # re-hashes every file
    assert manifest.family == "vit"
    assert manifest.task == (
        "image-classification" if source in CLASSIFIERS else "image-feature-extraction"
    )
    assert manifest.profile.name == profile
    assert manifest.profile.model.task == manifest.task, "auto is resolved in the manifest"
    weights = source_dir(source) / "model.safetensors"
    assert manifest.source.weights_sha256 == {"model.safetensors": sha256_file(weights)}
    for relative, record in manifest.files.items():
        assert record.size == (artifact / relative).stat().st_size
    component = manifest.components["vision_model"]
    assert component.inputs["pixel_values"].shape == ("batch", 3, 32, 32)
    validation = component.validation
    assert validation.passed is True and validation.tolerance is not None
    assert validation.batch_sizes == (1, 4)
    for metrics in validation.outputs.values():
        assert metrics.max_abs <= validation.tolerance.atol
        assert metrics.min_cosine >= validation.tolerance.min_cosine
    if source in CLASSIFIERS:
        assert validation.outputs["logits"].top1_agreement == 1.0
    assert {"numpy", "torch"} <= set(manifest.versions)
    assert manifest.build.seconds > 0
    assert manifest.build.peak_rss_bytes > 10_000_000
    precision = component.runtime["inference_precision"]
    assert precision == ("bf16" if "bf16" in profile else "f32") or _cpu_lacks_bf16()
    assert manifest.model_info["preprocessing"]["mean"]


def _cpu_lacks_bf16() -> bool:
    import openvino as ov

    return "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        pytest.param("vit-onnxruntime-fp32", {"model.onnx"}, marks=pytest.mark.onnxruntime),
        pytest.param(
            "vit-openvino-fp32",
            {"openvino_model.xml", "openvino_model.bin"},
            marks=pytest.mark.openvino,
        ),
        pytest.param("vit-torch-fp32", {"model.safetensors", "modelkiln_vision_model.json"}),
    ],
)
@pytest.mark.parametrize("source", ["hf-classifier", "timm-classifier"])
def test_layout_follows_optimum(
    source: str, profile: str, expected: set[str], built: Callable[..., Path]
) -> None:
    artifact = built(source, profile)
    names = {p.name for p in artifact.iterdir()}
    configs = {"config.json", "kiln.json"} | (
        {"preprocessor_config.json"} if source.startswith("hf") else set()
    )
    assert names == expected | configs
    config = json.loads((artifact / "config.json").read_text())
    if source.startswith("timm"):
        # optimum reads timm configs through a plain PretrainedConfig: labels at the top level,
        # no hf_hub_id (optimum-intel would query the hub for it).
        assert config["id2label"] == {str(i): f"LABEL_{i}" for i in range(10)}
        assert "hf_hub_id" not in config
        assert config["pretrained_cfg"]["crop_pct"] == 0.9
    else:
        assert config["model_type"] == "vit"


@pytest.mark.onnxruntime
def test_onnx_graph_is_opset_18_with_dynamic_batch(built: Callable[..., Path]) -> None:
    import onnx

    model = onnx.load(str(built("hf-classifier", "vit-onnxruntime-fp32") / "model.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (graph_input,) = model.graph.input
    assert graph_input.name == "pixel_values"
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in model.graph.output] == ["logits"]


@pytest.mark.onnxruntime
def test_external_data_goes_to_one_onnx_data_file(
    built: Callable[..., Path], rgb_images: list[np.ndarray]
) -> None:
    artifact = built("hf-classifier", "vit-onnxruntime-fp32", "export.external_data=always")
    assert (artifact / "model.onnx_data").stat().st_size > 40_000
    assert not list(artifact.glob("*.data"))
    inline = load(built("hf-classifier", "vit-onnxruntime-fp32")).logits(rgb_images)
    np.testing.assert_allclose(load(artifact).logits(rgb_images), inline, atol=1e-6)


@pytest.mark.parametrize(
    "profile",
    [
        pytest.param("vit-onnxruntime-fp32", marks=pytest.mark.onnxruntime),
        pytest.param("vit-openvino-fp32", marks=pytest.mark.openvino),
    ],
)
def test_static_batch_export_pads_short_batches(
    profile: str, built: Callable[..., Path], rgb_images: list[np.ndarray]
) -> None:
    static = built(
        "hf-classifier",
        profile,
        "shapes.dynamic_batch=false",
        "shapes.batch_size=2",
        "validation.batch_sizes=[2]",
    )
    with load(static) as pipeline:
        assert pipeline.session.input_specs["pixel_values"].shape == (2, 3, 32, 32)
        logits = pipeline.logits(rgb_images, batch_size=8)  # 3 images: one full batch, one padded
    dynamic = load(built("hf-classifier", profile)).logits(rgb_images)
    np.testing.assert_allclose(logits, dynamic, atol=1e-5)


@pytest.mark.onnxruntime
@pytest.mark.parametrize("source", BACKBONES)
def test_hidden_layers_are_exported_and_embeddable(
    source: str,
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
    rgb_images: list[np.ndarray],
) -> None:
    artifact = built(source, "vit-onnxruntime-fp32", "model.hidden_layers=[1, 2]")
    with load(artifact) as pipeline:
        assert pipeline.layers == [1, 2]
        pixels = pipeline.preprocessor(load_images(rgb_images))
        outputs = pipeline.session.run({"pixel_values": pixels})
        vectors = pipeline(rgb_images, layer=1, pooling="cls", normalize=False)
    np.testing.assert_allclose(vectors, outputs["hidden_state_1"][:, 0], atol=1e-6)
    if source.startswith("hf"):
        expected = torch_reference(source, source_dir(source), pixels)
        for k in (1, 2):
            np.testing.assert_allclose(
                outputs[f"hidden_state_{k}"], expected[f"hidden_state_{k}"], atol=1e-4
            )
    else:
        import timm
        import torch

        model = timm.create_model(f"local-dir:{source_dir(source)}", pretrained=True).eval()
        with torch.inference_mode():
            blocks = model.forward_intermediates(
                torch.from_numpy(pixels),
                indices=[0, 1],
                return_prefix_tokens=True,
                output_fmt="NLC",
                intermediates_only=True,
            )
        for k, (tokens, prefix) in zip((1, 2), blocks, strict=True):
            np.testing.assert_allclose(
                outputs[f"hidden_state_{k}"], torch.cat([prefix, tokens], 1).numpy(), atol=1e-4
            )


@pytest.mark.onnxruntime
def test_classifier_source_can_be_built_for_feature_extraction(
    built: Callable[..., Path], rgb_images: list[np.ndarray]
) -> None:
    artifact = built("hf-classifier", "vit-onnxruntime-fp32", "model.task=image-feature-extraction")
    with load(artifact) as pipeline:
        assert pipeline.task == "image-feature-extraction"
        # ViTForImageClassification's backbone has no pooler: auto falls back to the CLS token.
        assert set(pipeline.session.output_specs) == {"last_hidden_state"}
        vectors = pipeline(rgb_images)
    assert vectors.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_backbone_cannot_be_built_as_classifier(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    with pytest.raises(
        UnsupportedError,
        match=r"has no classification head; build it with model\.task = 'image-feature-extraction'",
    ):
        build(
            source_dir("hf-backbone"),
            "vit-torch-fp32",
            tmp_path / "x",
            overrides=["model.task=image-classification"],
        )
    assert not (tmp_path / "x").exists()


def test_hidden_layer_out_of_range(source_dir: Callable[[str], Path], tmp_path: Path) -> None:
    from modelkiln.errors import ProfileError

    with pytest.raises(
        ProfileError, match=r"model.hidden_layers \[3\] out of range: this model has blocks 1..2"
    ):
        build(
            source_dir("hf-backbone"),
            "vit-torch-fp32",
            tmp_path / "x",
            overrides=["model.hidden_layers=[3]"],
        )


@pytest.mark.openvino
def test_missed_tolerance_fails_the_build_and_keeps_the_previous_artifact(
    built: Callable[..., Path], source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    target = tmp_path / "artifact"
    shutil.copytree(built("hf-classifier", "vit-openvino-bf16"), target)
    before = (target / "kiln.json").read_text()
    with pytest.raises(
        ValidationError,
        match=r"vision_model \(openvino on openvino, bf16\) output 'logits' missed the profile's tolerance: max-abs diff .* > atol 1e-09",
    ):
        build(
            source_dir("hf-classifier"),
            "vit-openvino-bf16",
            target,
            overrides=["validation.atol=1e-9"],
        )
    assert (target / "kiln.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"], (
        "no staging directory left behind"
    )
    open_artifact(target, verify=True)
