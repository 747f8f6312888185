"""Bundles: `kiln package` -> `kiln verify` -> `modelkiln.load`, and every way one is refused.

Each test gets its own bundle cache ($MODELKILN_CACHE) under tmp_path.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from modelkiln import load, open_artifact
from modelkiln.artifact import record_files
from modelkiln.cli import cli, main
from modelkiln.errors import ArtifactError, StorageError, UnsupportedError
from modelkiln.models import FAMILIES
from modelkiln.packaging import (
    cache_root,
    deployment_targets,
    package,
    requirements,
    verify_bundle,
)
from modelkiln.packaging.contents import bundle_files
from modelkiln.plan import load_profile
from modelkiln.profiles import ExportSettings, Profile
from modelkiln.records import (
    BuildRecord,
    ComponentRecord,
    FileRecord,
    Manifest,
    SourceRecord,
    seal,
)

pytestmark = [pytest.mark.torch, pytest.mark.onnxruntime]

ONNX = "vit-onnxruntime-fp32"
OPENVINO = "vit-openvino-fp32"
GENERATED = ["bundle.json", "README.md", "kiln.json"]  # first in every bundle, in this order
CONFIGS = {"config.json", "preprocessor_config.json"}
MODEL_FILES = {
    ONNX: {"model.onnx"},
    OPENVINO: {"openvino_model.xml", "openvino_model.bin"},
}
SUFFIXES = [".tar.gz", ".zip"]
# (profile, target, requirement, format)
ROUND_TRIPS = [
    pytest.param(ONNX, "android", "onnxruntime>=1.19", "onnx", id="onnx-android"),
    pytest.param(
        OPENVINO,
        "linux-aarch64",
        "openvino>=2024.4",
        "openvino",
        marks=pytest.mark.openvino,
        id="openvino-linux-aarch64",
    ),
]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's bundle cache (the directory load() unpacks bundles into)."""
    monkeypatch.setenv("MODELKILN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "bundles"


@pytest.fixture
def artifact(built: Callable[..., Path]) -> Path:
    return built("hf-classifier", ONNX)


@pytest.fixture(params=SUFFIXES)
def bundle(request: pytest.FixtureRequest, artifact: Path, tmp_path: Path) -> Path:
    """The ONNX ViT packed for linux-x86_64, as a .tar.gz and as a .zip."""
    return package(artifact, "linux-x86_64", tmp_path / f"vit{request.param}").path


@pytest.fixture
def tar_bundle(artifact: Path, tmp_path: Path) -> Path:
    return package(artifact, "linux-x86_64", tmp_path / "vit.tar.gz").path


def suffix_of(bundle: Path) -> str:
    return ".zip" if bundle.name.endswith(".zip") else ".tar.gz"


def members(bundle: Path) -> dict[str, bytes]:
    """Every file member's content, in archive order."""
    if bundle.name.endswith(".zip"):
        with zipfile.ZipFile(bundle) as archive:
            return {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}
    with tarfile.open(bundle, "r:gz") as archive:
        return {
            m.name: archive.extractfile(m).read()  # type: ignore[union-attr]
            for m in archive
            if m.isfile()
        }


def write_members(path: Path, contents: Iterable[tuple[str, bytes]]) -> Path:
    """An archive with exactly these members: a hand-made bundle, names unchecked."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in contents:
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, data)
    else:
        with tarfile.open(path, "w:gz") as archive:
            for name, data in contents:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def altered(bundle: Path, tmp_path: Path, changes: dict[str, bytes | None]) -> Path:
    """A copy of bundle with members replaced (bytes) or removed (None)."""
    contents = members(bundle)
    for name, data in changes.items():
        if data is None:
            del contents[name]
        else:
            contents[name] = data
    return write_members(tmp_path / f"altered{suffix_of(bundle)}", contents.items())


def flipped(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x01
    return bytes(changed)


def refused(bundle: Path, message: str) -> None:
    """verify and load both refuse bundle with message, and nothing reaches the cache."""
    with pytest.raises(ArtifactError) as verifying:
        verify_bundle(bundle)
    assert message in str(verifying.value)
    with pytest.raises(ArtifactError) as loading:
        load(bundle)
    assert str(loading.value) == str(verifying.value)
    assert list(cache_root().iterdir()) == [], "no cache entry, no leftovers"


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(("profile", "target", "requirement", "format"), ROUND_TRIPS)
def test_round_trip(
    profile: str,
    target: str,
    requirement: str,
    format: str,
    suffix: str,
    built: Callable[..., Path],
    tmp_path: Path,
    cache: Path,
    rgb_images: list[np.ndarray],
) -> None:
    artifact = built("hf-classifier", profile)
    made = package(artifact, target, tmp_path / f"vit{suffix}")
    assert made.left_out == ()
    contents = members(made.path)
    assert list(contents)[:3] == GENERATED
    assert set(contents) == {*GENERATED, *CONFIGS, *MODEL_FILES[profile]}

    data = json.loads(contents["bundle.json"])
    assert {k: data[k] for k in ("schema", "schema_version", "target", "format", "task")} == {
        "schema": "modelkiln-bundle",
        "schema_version": 1,
        "target": target,
        "format": format,
        "task": "image-classification",
    }
    assert (data["family"], data["profile"]) == ("vit", profile)
    assert data["requirements"] == [requirement]
    assert data["files"].keys() == contents.keys() - {"bundle.json"}
    for name, record in data["files"].items():
        sha256 = hashlib.sha256(contents[name]).hexdigest()
        assert record == {"size": len(contents[name]), "sha256": sha256}, name
    built_manifest = (artifact / "kiln.json").read_bytes()
    assert contents["kiln.json"] == built_manifest, "packed whole: kiln.json as built"
    readme = contents["README.md"].decode()
    runtime = requirement.split(">=")[0]
    assert f"`{requirement}` (validated with {runtime} " in readme
    assert f'modelkiln.load("vit{suffix}")' in readme
    assert f"kiln classify vit{suffix} IMAGE.png" in readme

    assert verify_bundle(made.path) == made.manifest
    with load(artifact) as direct, load(made.path) as packed:
        np.testing.assert_allclose(
            packed.logits(rgb_images), direct.logits(rgb_images), rtol=0, atol=1e-6
        )
    (unpacked,) = cache.iterdir()
    assert unpacked.name == hashlib.sha256(made.path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_packing_is_reproducible(artifact: Path, tmp_path: Path, suffix: str) -> None:
    """The same artifact packs to the same bytes, so to the same cache entry."""
    output = tmp_path / f"vit{suffix}"
    first = package(artifact, "linux-x86_64", output).path.read_bytes()
    assert package(artifact, "linux-x86_64", output).path.read_bytes() == first


def test_load_unpacks_once(
    tar_bundle: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, rgb_images: list[np.ndarray]
) -> None:
    bundle = tar_bundle
    root = open_artifact(bundle).root
    assert root.parent == cache
    with monkeypatch.context() as patched:
        patched.setattr(
            "modelkiln.packaging.unpack.extract_archive",
            lambda *args: pytest.fail("a bundle in the cache is not unpacked again"),
        )
        assert open_artifact(bundle).root == root
    # A damaged copy in the cache is replaced, not trusted.
    (root / "model.onnx").write_bytes(b"")
    with load(bundle) as pipeline:
        assert pipeline.logits(rgb_images).shape == (3, 10)
    assert list(cache.iterdir()) == [root]


def test_only_what_the_runtime_reads(artifact: Path, tmp_path: Path) -> None:
    """Files kiln.json lists beyond the runtime's (torch weights, notes) stay out."""
    copy = Path(shutil.copytree(artifact, tmp_path / "artifact"))
    (copy / "reference").mkdir()
    (copy / "reference" / "model.safetensors").write_bytes(b"torch weights")
    (copy / "notes.txt").write_text("how it was made")
    manifest = json.loads((copy / "kiln.json").read_text())
    manifest["files"] = {k: asdict(v) for k, v in record_files(copy).items()}
    (copy / "kiln.json").write_text(json.dumps(seal(manifest), indent=2) + "\n")

    made = package(copy, "linux-x86_64", tmp_path / "vit.zip")
    assert made.left_out == ("notes.txt", "reference/model.safetensors")
    assert set(members(made.path)) == {*GENERATED, *CONFIGS, "model.onnx"}
    opened = open_artifact(made.path)
    assert set(opened.manifest.files) == {*CONFIGS, "model.onnx"}, "kiln.json cut to the bundle"
    assert opened.manifest.components == open_artifact(artifact).manifest.components


# --- refused bundles ------------------------------------------------------------------------


def test_a_tampered_member_is_refused(bundle: Path, tmp_path: Path) -> None:
    model = members(bundle)["model.onnx"]
    refused(
        altered(bundle, tmp_path, {"model.onnx": flipped(model)}),
        "failed verification: model.onnx has changed (sha256 differs from bundle.json); "
        "package the artifact again (`kiln package`)",
    )


def test_a_resized_member_is_refused(bundle: Path, tmp_path: Path) -> None:
    refused(
        altered(bundle, tmp_path, {"config.json": b"{}"}),
        "failed verification: config.json has 2 bytes, bundle.json says",
    )


def test_a_member_changed_with_bundle_json_is_refused(bundle: Path, tmp_path: Path) -> None:
    """Rewriting bundle.json to match a changed model still disagrees with kiln.json."""
    contents = members(bundle)
    model = flipped(contents["model.onnx"])
    data = json.loads(contents["bundle.json"])
    data["files"]["model.onnx"]["sha256"] = hashlib.sha256(model).hexdigest()
    tampered = altered(
        bundle, tmp_path, {"model.onnx": model, "bundle.json": json.dumps(data).encode()}
    )
    refused(tampered, "failed verification: model.onnx differs between kiln.json and bundle.json")


def test_an_extra_member_is_refused(bundle: Path, tmp_path: Path) -> None:
    refused(
        altered(bundle, tmp_path, {"extra.txt": b"not from kiln package"}),
        "failed verification: extra.txt is not listed in bundle.json",
    )


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_bundle_bomb_writes_no_more_than_bundle_json_declares(
    artifact: Path, tmp_path: Path, suffix: str
) -> None:
    """64 MB of zeros compress to a few dozen KB: unlisted, or under a small declared size,
    they are refused before they reach the disk."""
    original = package(artifact, "linux-x86_64", tmp_path / f"vit{suffix}").path
    zeros = bytes(64 << 20)
    bomb = altered(original, tmp_path, {"padding.bin": zeros})
    assert bomb.stat().st_size < 2 << 20
    refused(bomb, "failed verification: padding.bin is not listed in bundle.json")
    declared = len(members(original)["config.json"])
    bomb = altered(original, tmp_path, {"config.json": zeros})
    refused(
        bomb, f"failed verification: config.json has {64 << 20} bytes, bundle.json says {declared}"
    )


def test_a_missing_member_is_refused(bundle: Path, tmp_path: Path) -> None:
    refused(
        altered(bundle, tmp_path, {"preprocessor_config.json": None}),
        "failed verification: preprocessor_config.json is missing",
    )


def test_a_bundle_without_bundle_json_is_refused(bundle: Path, tmp_path: Path) -> None:
    refused(altered(bundle, tmp_path, {"bundle.json": None}), "is not a modelkiln bundle")


@pytest.mark.parametrize("name", ["../evil.txt", "sub/../../evil.txt", "ABSOLUTE"])
def test_path_traversal_is_refused(bundle: Path, tmp_path: Path, name: str) -> None:
    name = str(tmp_path / "evil.txt") if name == "ABSOLUTE" else name
    evil = write_members(
        tmp_path / f"evil{suffix_of(bundle)}", [*members(bundle).items(), (name, b"x")]
    )
    refused(evil, f"has a member that points outside it: '{name}' (an absolute path or '..')")
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("evil.txt")] == []


def test_links_and_duplicates_are_refused(tar_bundle: Path, tmp_path: Path) -> None:
    contents = members(tar_bundle)
    linked = tmp_path / "linked.tar.gz"
    with tarfile.open(linked, "w:gz") as archive:
        info = tarfile.TarInfo("model.onnx")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(info)
    refused(linked, "member 'model.onnx' is a link; a bundle holds only regular files")

    twice = write_members(
        tmp_path / "twice.tar.gz", [*contents.items(), ("model.onnx", contents["model.onnx"])]
    )
    refused(twice, "has two members named 'model.onnx'")


def test_a_corrupted_archive_is_refused(bundle: Path, tmp_path: Path) -> None:
    broken = tmp_path / f"broken{suffix_of(bundle)}"
    broken.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    refused(broken, "is not a readable")


# --- what cannot be packaged ----------------------------------------------------------------


def test_a_format_the_target_cannot_run(
    artifact: Path, built: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(UnsupportedError) as raised:
        package(artifact, "ios", tmp_path / "vit.zip")
    assert str(raised.value) == (
        "target 'ios' cannot run this onnx artifact; ios takes: coreml "
        "(build with a profile of that format: `kiln profiles list`)"
    )
    with pytest.raises(UnsupportedError, match="target 'linux-x86_64' cannot run this torch "):
        package(built("hf-classifier", "vit-torch-fp32"), "linux-x86_64", tmp_path / "t.zip")
    with pytest.raises(UnsupportedError, match=r"unknown target 'andriod' \(did you mean 'an"):
        package(artifact, "andriod", tmp_path / "vit.zip")
    assert list(tmp_path.iterdir()) == [], "nothing written"


@pytest.mark.openvino
def test_openvino_is_refused_for_android(built: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="'android' cannot run this openvino artifact; "):
        package(built("hf-classifier", OPENVINO), "android", tmp_path / "vit.zip")


@pytest.mark.parametrize("name", ["vit.tar", "vit.tgz", "vit", "vit.gz"])
def test_a_bundle_name_must_say_its_format(artifact: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsupportedError, match=r"must end in \.tar\.gz or \.zip; got '"):
        package(artifact, "linux-x86_64", tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_old_bundle(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "vit.zip"
    output.write_bytes(b"the previous bundle")

    def full_disk(raw: io.BufferedWriter, members: object) -> None:
        raw.write(b"half a bundle")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr("modelkiln.packaging.archive._write_zip", full_disk)
        with pytest.raises(StorageError, match=r"vit.zip: no space left on device; free some"):
            package(artifact, "linux-x86_64", output)
    assert output.read_bytes() == b"the previous bundle"
    assert [p.name for p in tmp_path.iterdir()] == ["vit.zip"], "no partial file left"
    package(artifact, "linux-x86_64", output)
    assert zipfile.is_zipfile(output)


def _listing(
    family: str, task: str, format: str, entries: dict[str, str], files: set[str]
) -> Manifest:
    """A manifest of a format nothing here builds: its component entries and file list."""
    return Manifest(
        family=family,
        pipeline=FAMILIES.get(family).pipeline_for(task),
        task=task,
        format=format,
        runtime=format,
        source=SourceRecord("listed"),
        profile=Profile(name="listed", family=family, export=ExportSettings(format=format)),
        components={name: ComponentRecord(name, entry, {}, {}) for name, entry in entries.items()},
        files={name: FileRecord(1, "0" * 64) for name in files},
        model_info={},
        versions={},
        build=BuildRecord("2026-01-01T00:00:00+00:00", 0.0, 0, {}),
        modelkiln_version="0",
    )


def test_coreml_bundles_take_the_whole_mlpackage() -> None:
    """The selection for an SD artifact (tests/exporters/test_coreml.py packs a real ViT)."""
    package_dir = "unet/model.mlpackage"
    runtime_files = {
        f"{package_dir}/Manifest.json",
        f"{package_dir}/Data/com.apple.CoreML/model.mlmodel",
        f"{package_dir}/Data/com.apple.CoreML/weights/weight.bin",
        "unet/config.json",
        "text_encoder/model.mlpackage/Manifest.json",
        "text_encoder/config.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    }
    others = {"unet_reference/diffusion_pytorch_model.safetensors", "tokenizer_2/vocab.json"}
    entries = {name: f"{name}/model.mlpackage" for name in ("unet", "text_encoder")}
    manifest = _listing("sd", "text-to-image", "coreml", entries, runtime_files | others)
    assert set(bundle_files(manifest)) == runtime_files
    assert requirements("ios", "coreml", manifest.profile) == ("iOS>=17",)
    assert requirements("macos", "coreml", manifest.profile) == ("macOS>=14",)
    # The OS release follows the deployment target the artifact was built for.
    for target, ios, macos in (
        ("iOS18", "iOS>=18", "macOS>=15"),
        ("macOS13", "iOS>=16", "macOS>=13"),
    ):
        built_for = load_profile("sd-coreml-fp16", [f"coreml.target={target}"])
        assert requirements("ios", "coreml", built_for) == (ios,)
        assert requirements("macos", "coreml", built_for) == (macos,)
    assert {t for t, formats in deployment_targets().items() if "coreml" in formats} == {
        "ios",
        "macos",
    }


def test_tensorrt_bundles_carry_the_engine_its_record_and_its_onnx() -> None:
    """No GPU here to build one: the selection on a TensorRT artifact's file list."""
    runtime_files = {
        "model.engine",
        "engine.json",
        "model.onnx",
        "model.onnx_data",
        "config.json",
        "preprocessor_config.json",
    }
    entries = {"vision_model": "model.engine"}
    manifest = _listing(
        "vit", "image-classification", "tensorrt", entries, runtime_files | {"notes.txt"}
    )
    assert set(bundle_files(manifest)) == runtime_files
    assert requirements("linux-x86_64", "tensorrt", manifest.profile) == ("tensorrt>=10,<11",)
    assert {t for t, formats in deployment_targets().items() if "tensorrt" in formats} == {
        "linux-x86_64",
        "linux-aarch64",
    }


# --- the CLI --------------------------------------------------------------------------------


WIDE = {"COLUMNS": "1000"}


def invoke(*args: object) -> Result:
    return CliRunner(env=WIDE).invoke(cli, [str(a) for a in args])


@pytest.fixture
def kiln_main(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, str]]:
    """kiln_main(*args) -> (exit code, the one error line) of modelkiln.cli.main, in-process."""
    # main() setdefaults these; keep the process environment as it was.
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.setenv("COLUMNS", WIDE["COLUMNS"])

    def run(*args: object) -> tuple[int, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main([str(a) for a in args])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert "Traceback" not in "\n".join(lines)
        # Progress lines: steps done (✓) and the one the error ended (✗).
        assert all(line.startswith(("✓ ", "✗ ")) for line in lines[:-1]), lines
        code = exited.value.code
        return (code if isinstance(code, int) else 1), lines[-1]

    return run


def test_cli_package_verify_and_run(
    artifact: Path, tmp_path: Path, image_files: list[Path]
) -> None:
    output = tmp_path / "vit.tar.gz"
    result = invoke("package", artifact, "--target", "linux-x86_64", "-o", output)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"packaged {output} for linux-x86_64: 5 files, 0.")

    result = invoke("verify", output)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"ok {output}: 5 files match bundle.json (onnx for linux-x86_64)"
    )

    packed = invoke("classify", output, *image_files, "--json")
    assert packed.exit_code == 0, packed.output
    direct = invoke("classify", artifact, *image_files, "--json")
    for got, expected in zip(json.loads(packed.stdout), json.loads(direct.stdout), strict=True):
        assert [p["label"] for p in got["predictions"]] == [
            p["label"] for p in expected["predictions"]
        ]
        assert [p["score"] for p in got["predictions"]] == pytest.approx(
            [p["score"] for p in expected["predictions"]], abs=1e-6
        )


def test_cli_errors(
    tar_bundle: Path, artifact: Path, tmp_path: Path, kiln_main: Callable[..., tuple[int, str]]
) -> None:
    model = flipped(members(tar_bundle)["model.onnx"])
    tampered = altered(tar_bundle, tmp_path, {"model.onnx": model})
    assert kiln_main("verify", tampered) == (
        1,
        f"error: bundle {tampered} failed verification: model.onnx has changed (sha256 differs "
        "from bundle.json); package the artifact again (`kiln package`)",
    )
    assert kiln_main("package", artifact, "-t", "linux-x86_64", "-o", "vit.tar") == (
        2,
        "error: bundle vit.tar must end in .tar.gz or .zip; got '.tar'",
    )
    code, line = kiln_main("package", artifact, "-t", "ios", "-o", tmp_path / "v.zip")
    assert code == 2
    assert line.startswith("error: target 'ios' cannot run this onnx artifact; ios takes: coreml")

    result = invoke("package", artifact, "--target", "windows", "-o", tmp_path / "v.zip")
    assert result.exit_code == 2
    assert "Invalid value for '-t' / '--target': 'windows' is not one of" in result.output
