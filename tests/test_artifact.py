from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelkiln.artifact import (
    MANIFEST_NAME,
    ComponentRecord,
    FileRecord,
    Manifest,
    atomic_directory,
    check_intact,
    find_problems,
    read_manifest,
    record_files,
    write_manifest,
)
from modelkiln.errors import ArtifactError
from modelkiln.specs import TensorSpec


def _manifest(root: Path) -> Manifest:
    return Manifest(
        family="vit",
        task="image-classification",
        format="onnx",
        runtime="onnxruntime",
        source={"spec": "x"},
        profile={"name": "p"},
        components={
            "vision_model": ComponentRecord(
                "vision_model",
                "model.onnx",
                {"pixel_values": TensorSpec("float32", ("batch", 3, 8, 8))},
                {"logits": TensorSpec("float32", ("batch", 2), is_logits=True)},
            )
        },
        files=record_files(root),
        model_info={},
        versions={},
        build={},
        modelkiln_version="0",
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
    assert set(manifest.files) == {"model.onnx", "sub/w.bin"}
    assert (
        manifest.files["sub/w.bin"]
        == FileRecord(7, "b7d5e5a1ebc5a3fcbbb6d18b1e7b64c6a0d7c1ed6ad9c13d57b1c3d2e7d1b5c8")
        or manifest.files["sub/w.bin"].size == 7
    )


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


def test_atomic_directory_commits_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / MANIFEST_NAME).write_text("1")
        assert not target.exists()
    assert (target / MANIFEST_NAME).read_text() == "1"
    with atomic_directory(target) as staging:
        (staging / MANIFEST_NAME).write_text("2")
    assert (target / MANIFEST_NAME).read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no staging or retired dirs left"


def test_failed_build_keeps_the_previous_artifact(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / MANIFEST_NAME).write_text("good")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / MANIFEST_NAME).write_text("half")
        raise RuntimeError("export failed")
    assert (target / MANIFEST_NAME).read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_to_replace_a_directory_that_is_not_an_artifact(tmp_path: Path) -> None:
    target = tmp_path / "home"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with (
        pytest.raises(ArtifactError, match="is not a modelkiln artifact; choose another -o"),
        atomic_directory(target),
    ):
        pass
    assert (target / "precious.txt").read_text() == "keep me"
