from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelkiln.artifact import (
    MANIFEST_NAME,
    check_intact,
    find_problems,
    read_manifest,
    record_files,
    write_manifest,
)
from modelkiln.errors import ArtifactError
from modelkiln.evaluation.metrics import Tolerance
from modelkiln.plan import load_profile
from modelkiln.records import (
    BuildRecord,
    ComponentRecord,
    EndToEndRecord,
    FileRecord,
    Manifest,
    OutputScore,
    QuantizationRecord,
    SourceRecord,
    ValidationRecord,
)
from modelkiln.specs import TensorSpec

SCORE = OutputScore(
    max_abs=0.01, mean_abs=0.001, min_cosine=0.999, sqnr_db=None, top1_agreement=1.0
)


def _manifest(root: Path) -> Manifest:
    return Manifest(
        family="vit",
        pipeline="image-classification",
        task="image-classification",
        format="onnx",
        runtime="onnxruntime",
        source=SourceRecord("x", weights_sha256={"model.safetensors": "0" * 64}),
        profile=load_profile("vit-onnxruntime-int8"),
        components={
            "vision_model": ComponentRecord(
                "vision_model",
                "model.onnx",
                {"pixel_values": TensorSpec("float32", ("batch", 3, 8, 8))},
                {"logits": TensorSpec("float32", ("batch", 2), is_logits=True)},
                validation=ValidationRecord(
                    passed=True,
                    tolerance=Tolerance(1.0, 0.99, 0.8, 15.0),
                    outputs={"logits": SCORE},
                    label="onnx on onnxruntime, fp32, int8-dynamic",
                    batch_sizes=(1, 4),
                ),
                runtime={"inference_precision": "f32", "threads": "default"},
                quantization=QuantizationRecord(
                    "int8-dynamic", 12, 400, 100, details={"ops": {"MatMulInteger": 12}}
                ),
            )
        },
        files=record_files(root),
        model_info={"labels": ["a", "b"]},
        versions={"numpy": "2"},
        build=BuildRecord("2026-12-05T00:00:00+00:00", 1.5, 10, {"python": "3.11"}),
        modelkiln_version="0",
        end_to_end=EndToEndRecord(data="digits", images=3, outputs={"logits": SCORE}, accuracy=0.5),
    )


def _artifact(root: Path) -> Manifest:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(b"graph" * 10)
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "w.bin").write_bytes(b"weights")
    manifest = _manifest(root)
    write_manifest(root, manifest)
    return manifest


def test_manifest_round_trips(tmp_path: Path) -> None:
    manifest = _artifact(tmp_path / "a")
    assert read_manifest(tmp_path / "a") == manifest
    document = json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    # The quantizer's own report sits beside the record's fields, as schema 1 wrote it.
    assert document["components"]["vision_model"]["quantization"] == {
        "scheme": "int8-dynamic",
        "quantized_weights": 12,
        "bytes_before": 400,
        "bytes_after": 100,
        "ops": {"MatMulInteger": 12},
    }
    assert document["components"]["vision_model"]["validation"]["outputs"]["logits"] == {
        "max_abs": 0.01,
        "mean_abs": 0.001,
        "min_cosine": 0.999,
        "sqnr_db": None,
        "top1_agreement": 1.0,
    }
    assert set(manifest.files) == {"model.onnx", "sub/w.bin"}
    assert (
        manifest.files["sub/w.bin"]
        == FileRecord(7, "b7d5e5a1ebc5a3fcbbb6d18b1e7b64c6a0d7c1ed6ad9c13d57b1c3d2e7d1b5c8")
        or manifest.files["sub/w.bin"].size == 7
    )


# What modelkiln 0.1's schema 1 wrote (abridged to the keys it always had).
V1 = {
    "family": "sd",
    "task": "inpainting",
    "format": "openvino",
    "runtime": "openvino",
    "source": {"spec": "sd-inpaint", "hub_id": None, "revision": None, "local_dir": "/m"},
    "profile": {
        "name": "sd-openvino-int8",
        "family": "sd",
        "schema_version": 1,
        "export": {"format": "openvino", "opset": 18, "via": "onnx", "fusions": "auto"},
        "runtime": {"name": "openvino", "device": "cpu", "performance_hint": "latency"},
        "quantization": {"scheme": "int8-weights", "symmetric": False, "group_size": 128},
        "coreml": {"target": "iOS17", "compute_units": "all", "flexible_shapes": "enumerated"},
        "tensorrt": {"optimization_level": 3, "timing_cache": True, "engine_cache": True},
    },
    "components": {
        "unet": {
            "name": "unet",
            "entry": "unet/openvino_model.xml",
            "inputs": {"sample": {"dtype": "float32", "shape": ["batch", 9, 8, 8]}},
            "outputs": {"out_sample": {"dtype": "float32", "shape": ["batch", 4, 8, 8]}},
            "validation": {
                "passed": True,
                "tolerance": {"atol": 1.0, "min_cosine": 0.99, "min_top1_agreement": 1.0},
                "outputs": {
                    "out_sample": {
                        "max_abs": 0.1,
                        "mean_abs": 0.01,
                        "min_cosine": 0.999,
                        "sqnr_db": 30.0,
                    }
                },
                "batch_sizes": [1],
            },
            "runtime": {"inference_precision": "bf16"},
            "quantization": {
                "scheme": "int8-weights",
                "quantized_weights": 10,
                "nncf_mode": "int8_asym",
                "bytes_before": 4,
                "bytes_after": 1,
            },
        }
    },
    "files": {},
    "model_info": {"height": 64},
    "versions": {},
    "build": {
        "created": "2026-11-01T00:00:00+00:00",
        "seconds": 9.0,
        "peak_rss_bytes": 1,
        "host": {},
    },
    "modelkiln_version": "0.1.0",
    "schema_version": 1,
    "end_to_end": {"prompts": ["a fox"], "steps": 4, "psnr_db": [30.1], "ssim": [0.9]},
}


def test_a_schema_1_manifest_reads_in_schema_2_terms(tmp_path: Path) -> None:
    root = tmp_path / "old"
    root.mkdir()
    (root / MANIFEST_NAME).write_text(json.dumps(V1))
    manifest = read_manifest(root)
    assert manifest.pipeline == "stable-diffusion"  # its family's, for its task
    assert manifest.profile.schema_version == 2
    assert manifest.profile.section("openvino") == {"via": "onnx", "performance_hint": "latency"}
    assert set(manifest.profile.sections) == {"openvino"}  # the others held only defaults
    unet = manifest.components["unet"]
    assert unet.validation.passed is True and unet.validation.batch_sizes == (1,)
    assert unet.validation.outputs["out_sample"].sqnr_db == 30.0
    assert unet.quantization == QuantizationRecord(
        "int8-weights", 10, 4, 1, details={"nncf_mode": "int8_asym"}
    )
    assert manifest.end_to_end == EndToEndRecord(
        prompts=("a fox",), steps=4, psnr_db=(30.1,), ssim=(0.9,)
    )
    write_manifest(root, manifest)  # written back in schema 2, it reads the same
    assert read_manifest(root) == manifest
    assert json.loads((root / MANIFEST_NAME).read_text())["schema_version"] == 2


def test_sha256_is_the_real_digest(tmp_path: Path) -> None:
    import hashlib

    manifest = _artifact(tmp_path / "a")
    assert manifest.files["sub/w.bin"].sha256 == hashlib.sha256(b"weights").hexdigest()


def test_problems_are_found_and_named(tmp_path: Path) -> None:
    root = tmp_path / "a"
    manifest = _artifact(root)
    assert find_problems(root, manifest, hashes=True) == []
    (root / "sub" / "w.bin").write_bytes(b"WEIGHTS")  # same size, other content
    assert find_problems(root, manifest, hashes=False) == []
    assert find_problems(root, manifest, hashes=True) == [
        "sub/w.bin has changed (sha256 differs from the manifest)"
    ]
    (root / "model.onnx").write_bytes(b"short")
    (root / "sub" / "w.bin").unlink()
    problems = find_problems(root, manifest, hashes=True)
    assert "model.onnx has 5 bytes, the manifest says 50" in problems
    assert "sub/w.bin is missing" in problems
    with pytest.raises(
        ArtifactError, match=r"incomplete or corrupted: model\.onnx has 5 bytes.*\(and 1 more\)"
    ):
        check_intact(root, manifest)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "the directory does not exist"),
        (lambda root: root.mkdir(), r"is not a modelkiln artifact \(no kiln\.json\)"),
        (lambda root: root.write_text("x"), "is a file, not an artifact directory"),
    ],
)
def test_read_manifest_errors(tmp_path: Path, setup, message: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "a"
    setup(root)
    with pytest.raises(ArtifactError, match=message):
        read_manifest(root)


def test_corrupted_and_newer_manifests_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "a"
    _artifact(root)
    (root / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        read_manifest(root)
    # valid JSON, but no object: one line, not an AttributeError from deep inside
    (root / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="must hold a JSON object, not list; rebuild"):
        read_manifest(root)
    (root / MANIFEST_NAME).write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema_version 99"):
        read_manifest(root)
    (root / MANIFEST_NAME).write_text(json.dumps({"schema_version": 1, "family": "vit"}))
    with pytest.raises(ArtifactError, match="is malformed"):
        read_manifest(root)
