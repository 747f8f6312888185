"""Disks, paths and files a user gets wrong are one-line errors, found before the work.

Each case names what is wrong and the fix, exits 1 (70 is kept for modelkiln's own bugs)
and leaves nothing behind: no empty folder, no half file, no staging of a killed build.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cli_support import Outcome, assert_one_line_error

from modelkiln.records import SourceRecord

pytestmark = pytest.mark.onnxruntime

PROFILE = "vit-onnxruntime-fp32"


def listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# --- outputs are checked before the work --------------------------------------------------


def test_a_build_into_a_file_is_refused_before_the_source_is_read(
    tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    (tmp_path / "file").write_text("x")
    # The source does not exist either: the output's error comes first.
    outcome = kiln_main(
        "build", tmp_path / "no-model", "--profile", PROFILE, "-o", tmp_path / "file" / "out"
    )
    assert_one_line_error(outcome, "file is a file, not a folder; choose another path")


def test_a_build_onto_a_read_only_disk_is_refused_before_the_source_is_read(
    tmp_path: Path, kiln_main: Callable[..., Outcome], small_disk: Callable[..., Path]
) -> None:
    disk = small_disk("1m", read_only=True)
    outcome = kiln_main("build", tmp_path / "no-model", "--profile", PROFILE, "-o", disk / "out")
    assert_one_line_error(outcome, f"cannot write into {disk}: permission denied or a read-only")


def test_an_output_path_that_is_not_utf8_is_refused_before_the_source_is_read(
    tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    out = tmp_path / os.fsdecode(b"\xffout")
    outcome = kiln_main("build", tmp_path / "no-model", "--profile", PROFILE, "-o", out)
    assert_one_line_error(outcome, "\\xffout is not valid UTF-8", "choose another name")


@pytest.mark.parametrize(
    "profile",
    [
        "vit-onnxruntime-fp32",
        pytest.param("vit-openvino-fp32", marks=pytest.mark.openvino),
        pytest.param("vit-openvino-int8", marks=pytest.mark.openvino),
    ],
)
def test_a_full_disk_fails_a_build_in_one_line_and_keeps_nothing(
    profile: str,
    source_dir: Callable[[str], Path],
    kiln_main: Callable[..., Outcome],
    small_disk: Callable[..., Path],
) -> None:
    disk = small_disk("48k")  # smaller than the tiny model's weights
    outcome = kiln_main(
        "build", source_dir("hf-classifier"), "--profile", profile, "-o", disk / "a"
    )
    # OpenVINO says "basic_ios::clear: iostream error": the full disk is named all the same.
    assert_one_line_error(outcome, f"{disk}/a: no space left on device", progress=True)
    assert "free some space or choose another location" in outcome.err
    assert listing(disk) == []


def test_embed_over_an_earlier_file_on_a_full_disk_keeps_it(
    built: Callable[..., Path],
    image_files: list[Path],
    kiln_main: Callable[..., Outcome],
    small_disk: Callable[..., Path],
) -> None:
    disk = small_disk("1m")
    earlier = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(disk / "v.npy", earlier)
    stats = os.statvfs(disk)
    (disk / "filler").write_bytes(bytes(stats.f_bavail * stats.f_frsize - 256))
    backbone = built("hf-backbone", PROFILE)
    outcome = kiln_main("embed", backbone, *image_files, "-o", disk / "v.npy")
    assert_one_line_error(outcome, "v.npy: no space left on device")
    np.testing.assert_array_equal(np.load(disk / "v.npy"), earlier)
    assert listing(disk) == ["filler", "v.npy"]


def test_embed_says_the_file_it_wrote_and_refuses_a_folder(
    built: Callable[..., Path],
    image_files: list[Path],
    tmp_path: Path,
    kiln_main: Callable[..., Outcome],
) -> None:
    backbone = built("hf-backbone", PROFILE)
    outcome = kiln_main("embed", backbone, *image_files, "-o", tmp_path / "vectors")
    assert outcome.code == 0, outcome.err
    assert f"wrote {tmp_path / 'vectors.npy'}: 3 × 32 float32" in outcome.out
    assert np.load(tmp_path / "vectors.npy").shape == (3, 32)
    (tmp_path / "folder.npy").mkdir()
    outcome = kiln_main("embed", backbone, *image_files, "-o", tmp_path / "folder.npy")
    assert_one_line_error(outcome, "folder.npy is a folder; give a file name for the output")


def test_bench_into_a_file_is_refused_before_measuring_and_leaves_no_folder(
    built: Callable[..., Path], tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    (tmp_path / "file").write_text("x")
    artifact = built("hf-classifier", PROFILE)
    outcome = kiln_main("bench", artifact, "-o", tmp_path / "file" / "report", "--runs", 1)
    assert_one_line_error(outcome, "file is a file, not a folder")
    assert listing(tmp_path) == ["file"]


# --- files that are not what they claim ---------------------------------------------------


def test_a_binary_profile_is_a_profile_error(
    tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    profile = tmp_path / "binary.toml"
    profile.write_bytes(bytes(range(256)) * 4)
    outcome = kiln_main("build", tmp_path, "--profile", profile, "-o", tmp_path / "out")
    assert_one_line_error(outcome, f"profile {profile} is not text (byte 128 is not UTF-8)")


def test_profiles_validate_checks_every_file(
    tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    missing = tmp_path / "missing.toml"
    outcome = kiln_main("profiles", "validate", binary, PROFILE, missing)
    assert outcome.code == 1
    assert f"ok {PROFILE}" in outcome.out
    assert f"invalid profile {binary} is not text" in outcome.err
    assert "invalid no profile" in outcome.err and "missing.toml" in outcome.err


def test_profiles_show_reads_back(tmp_path: Path, kiln_main: Callable[..., Outcome]) -> None:
    shown = kiln_main("profiles", "show", PROFILE).out
    odd = tmp_path / "odd.toml"
    odd.write_text(
        shown + '\n[components.""]\nscheme = "none"\n\n[components."a.b c"]\natol = 0.5\n'
    )
    first = kiln_main("profiles", "show", odd)
    assert first.code == 0, first.err
    assert '[components.""]' in first.out and '[components."a.b c"]' in first.out
    again = tmp_path / "again.toml"
    again.write_text(first.out)
    assert kiln_main("profiles", "show", again).out == first.out


def test_garbage_weights_are_a_source_error(
    source_dir: Callable[[str], Path], tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    source = Path(shutil.copytree(source_dir("hf-classifier"), tmp_path / "model"))
    weights = source / "model.safetensors"
    weights.write_bytes(np.random.default_rng(0).bytes(weights.stat().st_size))
    outcome = kiln_main("build", source, "--profile", PROFILE, "-o", tmp_path / "out")
    assert_one_line_error(
        outcome,
        f"{weights} is not a valid safetensors file",
        "download or save the weights again",
        progress=True,
    )


def test_a_source_path_that_is_not_utf8_is_a_source_error(
    source_dir: Callable[[str], Path], tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    try:
        source = Path(
            shutil.copytree(source_dir("hf-classifier"), tmp_path / os.fsdecode(b"\xffm"))
        )
    except OSError as error:  # file systems that store names as Unicode refuse it
        pytest.skip(f"this file system refuses non-UTF-8 names: {error}")
    outcome = kiln_main("build", source, "--profile", PROFILE, "-o", tmp_path / "out")
    assert_one_line_error(
        outcome, "\\xffm is not valid UTF-8", "rename it (or a folder above it)", progress=True
    )


# --- the right command for the artifact ----------------------------------------------------


@pytest.mark.torch
def test_classify_on_a_diffusion_artifact_suggests_generate(
    built: Callable[..., Path], image_files: list[Path], kiln_main: Callable[..., Outcome]
) -> None:
    outcome = kiln_main("classify", built("sd", "sd-onnxruntime-fp32"), image_files[0])
    line = assert_one_line_error(outcome, "this artifact generates images", "use `kiln generate`")
    assert "--set model.task" not in line, "a diffusion model cannot be rebuilt to classify"


def test_a_layer_the_model_lacks_gets_no_rebuild_hint(
    built: Callable[..., Path], image_files: list[Path], tmp_path: Path
) -> None:
    from modelkiln import load
    from modelkiln.errors import InputError

    with load(built("hf-backbone", PROFILE)) as pipeline:
        for layer, hint in (
            (1, "rebuild with --set 'model.hidden_layers=[1]'"),
            (99, "layers are block numbers 1..2"),
            (0, "layers are block numbers 1..2"),
        ):
            with pytest.raises(InputError) as caught:
                pipeline([image_files[0]], layer=layer)
            assert str(caught.value).endswith(hint), caught.value


def test_a_relative_source_is_found_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "model").mkdir()
    record = SourceRecord(spec="model", local_dir=str(tmp_path / "model"))
    monkeypatch.chdir(tmp_path.parent)
    assert record.location() == str(tmp_path / "model")
    assert SourceRecord(spec="model", hub_id="org/model").location() == "org/model"
    assert SourceRecord(spec="model", local_dir="/gone").location() == "model"


# --- exit codes ---------------------------------------------------------------------------


def test_a_bug_exits_70_a_user_error_2(
    monkeypatch: pytest.MonkeyPatch, kiln_main: Callable[..., Outcome]
) -> None:
    import modelkiln.profiles

    def broken() -> list[str]:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(modelkiln.profiles, "bundled_profile_names", broken)
    outcome = kiln_main("profiles", "list")
    assert outcome.code == 70
    assert outcome.err_lines == [
        "internal error: ZeroDivisionError: a bug (run with -v for the traceback and please "
        "report it)"
    ]
    monkeypatch.undo()
    assert kiln_main("profiles", "show", "no-such-profile").code == 2


# --- a killed build -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.openvino
def test_the_next_build_clears_what_a_killed_build_left(
    source_dir: Callable[[str], Path], tmp_path: Path, kiln_main: Callable[..., Outcome]
) -> None:
    source = source_dir("hf-classifier")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "modelkiln", "build", str(source)]
    command += ["--profile", "vit-openvino-fp32", "-o", str(out)]
    build = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(name.startswith(".out.building-") for name in listing(tmp_path)):
        assert build.poll() is None and time.monotonic() < deadline, "the build never staged"
        time.sleep(0.05)
    build.send_signal(signal.SIGKILL)
    build.wait()
    assert any(name.startswith(".out.building-") for name in listing(tmp_path))
    outcome = kiln_main("build", source, "--profile", "vit-openvino-fp32", "-o", out)
    assert outcome.code == 0, outcome.err
    assert listing(tmp_path) == ["out"]
