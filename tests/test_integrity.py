"""An artifact is trusted by content: loading verifies every file against kiln.json (hashing
only what changed since the last good check), kiln.json verifies itself, and nothing it names
may lead outside the artifact."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelkiln import artifact as artifact_module
from modelkiln import load, open_artifact
from modelkiln.errors import ArtifactError
from modelkiln.packaging import package
from modelkiln.records import seal

pytestmark = pytest.mark.onnxruntime
IMAGES = [np.full((32, 32, 3), 90, np.uint8)]


@pytest.fixture
def copy(built: Callable[..., Path], tmp_path: Path) -> Path:
    """A private copy of a built ViT (tests tamper with it)."""
    target = tmp_path / "vit"
    shutil.copytree(built("hf-classifier", "vit-onnxruntime-fp32"), target)
    return target


def _flip(path: Path, offset: int = -100) -> None:
    """One byte changed, the size kept."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit(root: Path, change: Callable[[dict], None], *, reseal: bool) -> None:
    document = json.loads((root / "kiln.json").read_text())
    change(document)
    if reseal:  # what someone who knows the format would do
        document = seal(document)
    (root / "kiln.json").write_text(json.dumps(document, indent=2))


def test_a_flipped_weight_byte_is_refused_at_load(copy: Path) -> None:
    load(copy).logits(IMAGES)
    _flip(copy / "model.onnx")
    with pytest.raises(ArtifactError, match=r"model\.onnx has changed \(sha256 differs"):
        load(copy)
    load(copy, verify=False)  # the opt-out checks sizes only


def test_an_edited_kiln_json_is_refused(copy: Path) -> None:
    def relabel(document: dict) -> None:
        document["model_info"]["labels"][0] = "dog"

    _edit(copy, relabel, reseal=False)
    with pytest.raises(
        ArtifactError, match=r"kiln\.json does not match its digest: it was changed"
    ):
        load(copy)
    with pytest.raises(ArtifactError, match="does not match its digest"):
        load(copy, verify=False)  # kiln.json is always checked: it is small


@pytest.mark.parametrize("entry", ["../../outside/model.onnx", "/etc/model.onnx"])
def test_an_entry_outside_the_artifact_is_refused_even_resealed(copy: Path, entry: str) -> None:
    def escape(document: dict) -> None:
        document["components"]["vision_model"]["entry"] = entry

    _edit(copy, escape, reseal=True)
    with pytest.raises(ArtifactError, match="points outside the artifact; refusing to open it"):
        open_artifact(copy)


def test_a_link_out_of_the_artifact_is_refused(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(copy / "model.onnx", outside)
    (copy / "model.onnx").symlink_to(outside)
    with pytest.raises(ArtifactError, match=r"model\.onnx leads outside the artifact \(a link\)"):
        open_artifact(copy, verify=False)


def test_files_are_hashed_again_only_when_they_change(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[str] = []
    real = artifact_module.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(artifact_module, "sha256_file", counting)
    open_artifact(copy)
    assert "model.onnx" in hashed
    hashed.clear()
    open_artifact(copy)
    assert hashed == []  # remembered: inode, mtime and size unchanged
    stat = (copy / "model.onnx").stat()
    os.utime(copy / "model.onnx", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    open_artifact(copy)
    assert hashed == ["model.onnx"]


def test_a_damaged_unpacked_bundle_is_unpacked_again(
    copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = tmp_path / "vit.tar.gz"
    package(copy, "linux-x86_64", bundle)
    expected = load(bundle).logits(IMAGES)
    unpacked = open_artifact(bundle).root
    _flip(unpacked / "model.onnx")  # the cache, not the bundle
    np.testing.assert_array_equal(load(bundle).logits(IMAGES), expected)
    assert "replacing the damaged unpacked copy" in caplog.text
