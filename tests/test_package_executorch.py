"""ExecuTorch bundles: what each partitioner needs on each target (Android's AAR, the pip
runtime), the Android round trip, the README's runner section (its Python block run against
the unpacked bundle), the linux-arm64 alias, and the refusal of a Core ML program for Android.

Each test gets its own bundle cache ($MODELKILN_CACHE) under tmp_path.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from modelkiln import load, open_artifact
from modelkiln.errors import ArtifactError, UnsupportedError
from modelkiln.packaging import package, requirements, verify_bundle
from modelkiln.packaging.targets import canonical_target, deployment_targets, requirement_name
from modelkiln.plan import load_profile
from modelkiln.profiles import Profile
from modelkiln.records import ValidationRecord
from modelkiln.runtimes.executorch import (
    ANDROID_AAR_VERSION,
    ANDROID_RUNTIME_RANGE,
    PIP_RUNTIME,
    ExecuTorchBackend,
)

if TYPE_CHECKING:
    from cli_support import Outcome

VIT = "vit-executorch-fp32"
SD = ("sd", "sd-executorch-fp32")
AAR = f"org.pytorch:executorch-android{ANDROID_RUNTIME_RANGE}"
VULKAN_AAR = f"org.pytorch:executorch-android-vulkan{ANDROID_RUNTIME_RANGE}"
DESKTOP = ("linux-x86_64", "linux-aarch64", "linux-arm64", "macos")
CORE_ML_ON_ANDROID = (
    "target 'android' cannot run this executorch program: it is lowered to Core ML "
    "(executorch.partitioner = 'coreml'), which only Apple devices run; rebuild with "
    "executorch.partitioner = 'xnnpack' (CPU) or 'vulkan' (GPU)"
)


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODELKILN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "bundles"


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle, "r:gz") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}  # type: ignore[union-attr]


def rewritten(bundle: Path, out: Path, name: str, data: bytes) -> Path:
    """A copy of bundle with one member's bytes replaced."""
    with tarfile.open(out, "w:gz") as archive:
        for member, content in members(bundle).items():
            info = tarfile.TarInfo(member)
            content = data if member == name else content
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return out


def code_blocks(readme: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", readme, re.S)


# --- what each program needs where (no build) -----------------------------------------------


def _profile(partitioner: str) -> Profile:
    return load_profile(VIT, [f"executorch.partitioner={partitioner}"])


@pytest.mark.parametrize("partitioner", ["xnnpack", "portable"])
@pytest.mark.parametrize("target", [*DESKTOP, "android"])
def test_cpu_programs_run_on_the_pip_runtime_and_the_android_aar(
    partitioner: str, target: str
) -> None:
    expected = (AAR,) if target == "android" else (PIP_RUNTIME,)
    assert requirements(target, "executorch", _profile(partitioner)) == expected


def test_a_vulkan_program_runs_on_the_vulkan_aar_only() -> None:
    assert requirements("android", "executorch", _profile("vulkan")) == (VULKAN_AAR, "Vulkan>=1.1")
    for target in DESKTOP:
        with pytest.raises(UnsupportedError) as raised:
            requirements(target, "executorch", _profile("vulkan"))
        assert str(raised.value) == (
            f"target '{canonical_target(target)}' cannot run this executorch program: it is "
            "lowered to Vulkan (executorch.partitioner = 'vulkan') and the pip runtime has no "
            "Vulkan delegate; package it for android (org.pytorch:executorch-android-vulkan), "
            "or rebuild with executorch.partitioner = 'xnnpack'"
        )


def test_a_core_ml_program_is_refused_everywhere_with_its_reason() -> None:
    with pytest.raises(UnsupportedError) as raised:
        requirements("android", "executorch", _profile("coreml"))
    assert str(raised.value) == CORE_ML_ON_ANDROID
    with pytest.raises(UnsupportedError, match=r"which only Apple devices run; rebuild with "):
        requirements("linux-aarch64", "executorch", _profile("coreml"))
    with pytest.raises(UnsupportedError, match=r"does not package Core ML-partitioned programs"):
        requirements("macos", "executorch", _profile("coreml"))
    with pytest.raises(UnsupportedError, match=r"target 'ios' cannot run this executorch arti"):
        requirements("ios", "executorch", _profile("xnnpack"))


def test_android_versions_follow_the_exporter() -> None:
    """A program runs on a runtime at least as new as its exporter, and ExecuTorch promises the
    next minor release too: the AAR range starts where the pip runtime's does, one minor
    wider; the README's Gradle version is inside it."""
    pip_low, pip_high = PIP_RUNTIME.removeprefix("executorch").split(",")
    low, high = ANDROID_RUNTIME_RANGE.split(",")
    assert low == pip_low == ">=1.5"
    major, minor = pip_high.removeprefix("<").split(".")
    assert high == f"<{major}.{int(minor) + 1}"
    assert ANDROID_AAR_VERSION.startswith("1.5.")
    # Android's requirement names the AAR, never a pip distribution kiln.json records.
    assert requirement_name(AAR) == "org.pytorch:executorch-android"
    assert "executorch" in deployment_targets()["android"]


def test_linux_arm64_is_linux_aarch64() -> None:
    assert canonical_target("linux-arm64") == "linux-aarch64"
    assert "linux-arm64" not in deployment_targets(), "listed once, under our name"
    profile = load_profile("vit-onnxruntime-fp32")
    assert requirements("linux-arm64", "onnx", profile) == requirements(
        "linux-aarch64", "onnx", profile
    )
    with pytest.raises(UnsupportedError, match=r"unknown target 'linux-arm65' \(did you mean"):
        requirements("linux-arm65", "onnx", profile)


# --- bundles of built programs --------------------------------------------------------------


@pytest.fixture
def vit(built: Callable[..., Path]) -> Path:
    return built("hf-classifier", VIT)


@pytest.mark.torch
@pytest.mark.executorch
def test_android_round_trip(
    vit: Path, tmp_path: Path, cache: Path, rgb_images: list[np.ndarray]
) -> None:
    made = package(vit, "android", tmp_path / "vit.tar.gz")
    contents = members(made.path)
    assert set(contents) == {
        "bundle.json",
        "README.md",
        "kiln.json",
        "model.pte",
        # Deliberately packed: the ops a selective-build runtime must register, and `info`.
        "delegation.json",
        "config.json",
        "preprocessor_config.json",
    }
    data = json.loads(contents["bundle.json"])
    assert (data["target"], data["format"], data["requirements"]) == (
        "android",
        "executorch",
        [AAR],
    )
    # The build ran the pip runtime on this machine, not the AAR: no validated version.
    assert data["validated_with"] == {}
    assert verify_bundle(made.path) == made.manifest
    with load(vit) as direct, load(made.path) as packed:
        np.testing.assert_allclose(
            packed.logits(rgb_images), direct.logits(rgb_images), rtol=0, atol=1e-6
        )
        assert packed.session.info["delegated_nodes"] == direct.session.info["delegated_nodes"]
    (unpacked,) = cache.iterdir()
    assert unpacked.name == hashlib.sha256(made.path.read_bytes()).hexdigest()


@pytest.mark.torch
@pytest.mark.executorch
@pytest.mark.parametrize("name", ["model.pte", "delegation.json"])
def test_a_tampered_android_bundle_is_refused(vit: Path, tmp_path: Path, name: str) -> None:
    bundle = package(vit, "android", tmp_path / "vit.tar.gz").path
    data = bytearray(members(bundle)[name])
    data[len(data) // 2] ^= 0x01
    tampered = rewritten(bundle, tmp_path / "tampered.tar.gz", name, bytes(data))
    message = f"failed verification: {name} has changed (sha256 differs from bundle.json)"
    with pytest.raises(ArtifactError, match=re.escape(message)):
        verify_bundle(tampered)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        load(tampered)


@pytest.mark.torch
@pytest.mark.executorch
def test_the_android_readme_runs_each_program_with_the_aar(vit: Path, tmp_path: Path) -> None:
    readme = members(package(vit, "android", tmp_path / "vit.tar.gz").path)["README.md"].decode()
    manifest = open_artifact(vit).manifest
    assert f"- `{AAR}`\n" in readme, "no validated version claimed for the AAR"
    assert f'implementation("org.pytorch:executorch-android:{ANDROID_AAR_VERSION}")' in readme
    version = manifest.versions["executorch"]
    assert f"Exported by ExecuTorch {version} and validated against torch" in readme
    (kotlin,) = code_blocks(readme, "kotlin")[1:]
    for line in (
        "import org.pytorch.executorch.Module",
        'val visionModel = Module.load(File(filesDir, "model.pte").absolutePath)',
        "val pixelValues = Tensor.fromBlob(FloatArray(1 * 3 * 32 * 32), longArrayOf(1, 3, 32, 32))"
        "  // float32 [batch, 3, 32, 32]",
        "val visionModelOutputs = visionModel.forward(EValue.from(pixelValues))",
        "val logits = visionModelOutputs[0].toTensor().dataAsFloatArray  // float32 [batch, 10]",
    ):
        assert line in kotlin.splitlines(), line
    # The family's part: the preprocessing, as preprocessor_config.json says.
    assert "as `preprocessor_config.json` describes it" in readme
    assert "resize to 32×32 (bilinear); multiply the 0-255 RGB values by 1/255; subtract the " in (
        readme
    )
    assert "mean [0.5, 0.5, 0.5] and divide by the std [0.5, 0.5, 0.5] per channel" in readme
    assert "`modelkiln.load(bundle)`" in readme


@pytest.mark.torch
@pytest.mark.executorch
def test_the_linux_readme_runs_as_written(vit: Path, tmp_path: Path) -> None:
    """linux-arm64 packs as linux-aarch64; the README's Python block runs the unpacked bundle."""
    made = package(vit, "linux-arm64", tmp_path / "vit.tar.gz")
    assert made.manifest.target == "linux-aarch64"
    assert made.manifest.requirements == (PIP_RUNTIME,)
    readme = members(made.path)["README.md"].decode()
    assert readme.startswith(f"# {VIT} for linux-aarch64\n")
    (cmake,) = code_blocks(readme, "cmake")
    assert "find_package(executorch REQUIRED COMPONENTS kernels_optimized backend_xnnpack)" in cmake
    assert (
        "target_link_libraries(app PRIVATE executorch::runtime executorch::kernels_optimized "
        "executorch::backend_xnnpack)"
    ) in cmake
    (cpp,) = code_blocks(readme, "cpp")
    assert 'Module vision_model("model.pte");' in cpp
    assert "make_tensor_ptr({1, 3, 32, 32}, std::vector<float>(1 * 3 * 32 * 32))" in cpp
    python = code_blocks(readme, "python")[-1]
    assert "torch.zeros((1, 3, 32, 32), dtype=torch.float32)" in python
    root = open_artifact(made.path).root
    check = python + "\nprint(tuple(logits.shape))\n"
    ran = subprocess.run(
        [sys.executable, "-c", check], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip().splitlines()[-1] == "(1, 10)"


@pytest.mark.torch
@pytest.mark.executorch
def test_the_runner_names_the_vulkan_aar_and_what_was_not_validated(vit: Path) -> None:
    """A Vulkan program (not built here: the readme is written from the manifest alone)."""
    manifest = open_artifact(vit).manifest
    not_run = "this ExecuTorch runtime has no VulkanBackend"
    vulkan = replace(
        manifest,
        profile=load_profile(VIT, ["executorch.partitioner=vulkan"]),
        components={
            name: replace(record, validation=ValidationRecord(passed=None, not_run=not_run))
            for name, record in manifest.components.items()
        },
    )
    text = ExecuTorchBackend.runner_readme("executorch", "android", vulkan)
    assert f'implementation("org.pytorch:executorch-android-vulkan:{ANDROID_AAR_VERSION}")' in text
    assert f"not validated (vision_model: {not_run})" in text
    assert ExecuTorchBackend.runner_readme("executorch", "ios", manifest) == ""


@pytest.mark.torch
@pytest.mark.executorch
def test_the_diffusion_readme_names_every_program_and_what_surrounds_them(
    built: Callable[..., Path], tmp_path: Path
) -> None:
    artifact = built(*SD)
    made = package(artifact, "android", tmp_path / "sd.tar.gz")
    contents = members(made.path)
    readme = contents["README.md"].decode()
    manifest = open_artifact(artifact).manifest
    assert set(manifest.components) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    for name, record in manifest.components.items():
        assert f'Module.load(File(filesDir, "{record.entry}").absolutePath)' in readme, name
        for spec in record.inputs.values():
            shape = ", ".join(map(str, spec.shape))
            assert f"// {spec.dtype} [{shape}]" in readme, (name, spec)
    # The UNet's timestep goes in 0-d, as kiln.json records it and the program takes it.
    assert "Tensor.fromBlob(FloatArray(1), longArrayOf())  // float32 []: a scalar" in readme
    tokenizer = sorted(n.removeprefix("tokenizer/") for n in contents if n.startswith("tokenizer/"))
    assert tokenizer, "the bundle carries the tokenizer"
    assert f"`tokenizer/` ({', '.join(f'`{n}`' for n in tokenizer)}) for `text_encoder`" in readme
    assert "`scheduler/scheduler_config.json`" in readme and "scheduler/scheduler_config.json" in (
        contents
    )
    assert "padded to 77 ids" in readme
    assert "run `unet` (sample, timestep, encoder_hidden_states)" in readme
    assert "(0.18215, in `vae_decoder/config.json`)" in readme
    assert "`modelkiln.load(bundle)`" in readme
    assert verify_bundle(made.path) == made.manifest

    # The linux README's Python block runs every program of the unpacked bundle.
    linux = package(artifact, "linux-x86_64", tmp_path / "sd-linux.tar.gz")
    python = code_blocks(members(linux.path)["README.md"].decode(), "python")[-1]
    check = python + "\nprint(tuple(vae_decoder_sample.shape))\n"
    ran = subprocess.run(
        [sys.executable, "-c", check],
        cwd=open_artifact(linux.path).root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip().splitlines()[-1] == "(1, 3, 32, 32)"


@pytest.mark.torch
@pytest.mark.executorch
def test_a_core_ml_program_is_not_packed_for_android(
    built: Callable[..., Path], tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    artifact = built("hf-classifier", VIT, "executorch.partitioner=coreml")
    with pytest.raises(UnsupportedError) as raised:
        package(artifact, "android", tmp_path / "out" / "vit.tar.gz")
    assert str(raised.value) == CORE_ML_ON_ANDROID
    outcome = kiln_main("package", str(artifact), "-t", "android", "-o", str(tmp_path / "v.zip"))
    assert outcome.code == 2, outcome
    assert outcome.err_lines[-1] == f"error: {CORE_ML_ON_ANDROID}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "v.zip").exists()


@pytest.mark.torch
@pytest.mark.executorch
def test_the_cli_takes_linux_arm64(
    vit: Path, tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    bundle = tmp_path / "vit.tar.gz"
    outcome = kiln_main("package", str(vit), "--target", "linux-arm64", "-o", str(bundle))
    assert outcome.code == 0, outcome
    assert outcome.out.startswith(f"packaged {bundle} for linux-aarch64: ")
    assert json.loads(members(bundle)["bundle.json"])["target"] == "linux-aarch64"
    outcome = kiln_main("package", str(vit), "--target", "linux-arm65", "-o", str(bundle))
    assert outcome.code == 2
    assert "'linux-arm65' is not one of" in outcome.err
