"""Outputs appear whole or not at all: staging and rename, the lock between writers, the
leftovers of killed runs, a full disk and unwritable places (modelkiln.outputs)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelkiln import outputs
from modelkiln.artifact import MANIFEST_NAME, read_manifest
from modelkiln.errors import ArtifactError, StorageError
from modelkiln.outputs import atomic_directory, atomic_file, check_writable, clean, output_lock

# A writer in another process: it stages TARGET with CONTENT, says "staged", and commits
# once RELEASE exists (or is killed before).
WRITER = """
import sys, time
from pathlib import Path
from modelkiln.outputs import atomic_directory
target, release, content = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
with atomic_directory(target, marker="kiln.json") as staging:
    (staging / "kiln.json").write_text(content)
    (staging / "weights.bin").write_bytes(bytes(100_000))
    print("staged", flush=True)
    while not release.exists():
        time.sleep(0.01)
"""
# Commits to TARGET COUNT times in a row.
COMMITTER = """
import os, sys
from pathlib import Path
from modelkiln.outputs import atomic_directory
target, count = Path(sys.argv[1]), int(sys.argv[2])
for i in range(count):
    with atomic_directory(target, marker="kiln.json") as staging:
        (staging / "kiln.json").write_text(f"{os.getpid()}-{i}")
"""


def start_writer(target: Path, release: Path, content: str) -> subprocess.Popen[str]:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), str(release), content],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "staged"
    return writer


def write(target: Path, content: str) -> None:
    with atomic_directory(target, marker=MANIFEST_NAME) as staging:
        (staging / MANIFEST_NAME).write_text(content)


def test_atomic_directory_commits_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_directory(target, marker=MANIFEST_NAME) as staging:
        (staging / MANIFEST_NAME).write_text("1")
        assert not target.exists()
        assert (tmp_path / ".out.lock").is_file()
    assert (target / MANIFEST_NAME).read_text() == "1"
    write(target, "2")
    assert (target / MANIFEST_NAME).read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no staging, retired or lock"


def test_without_an_exchanging_rename_two_renames_still_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outputs, "_exchange", lambda first, second: False)
    target = tmp_path / "out"
    write(target, "1")
    write(target, "2")
    assert (target / MANIFEST_NAME).read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_build_keeps_the_previous_artifact(tmp_path: Path) -> None:
    target = tmp_path / "out"
    write(target, "good")
    with pytest.raises(RuntimeError), atomic_directory(target, marker=MANIFEST_NAME) as staging:
        (staging / MANIFEST_NAME).write_text("half")
        raise RuntimeError("export failed")
    assert (target / MANIFEST_NAME).read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_to_replace_a_directory_that_is_not_ours(tmp_path: Path) -> None:
    target = tmp_path / "home"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with (
        pytest.raises(ArtifactError, match=r"is not a modelkiln output \(it has no kiln.json\)"),
        atomic_directory(target, marker=MANIFEST_NAME),
    ):
        pass
    assert (target / "precious.txt").read_text() == "keep me"


def test_the_next_build_clears_what_a_killed_build_left(tmp_path: Path) -> None:
    target = tmp_path / "out"
    write(target, "earlier")
    writer = start_writer(target, tmp_path / "never", "killed")
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.startswith(".out.building-") for name in left), left
    assert (target / MANIFEST_NAME).read_text() == "earlier"
    write(target, "next")
    assert (target / MANIFEST_NAME).read_text() == "next"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_artifact_a_kill_left_moved_aside_is_found_and_put_back(tmp_path: Path) -> None:
    # What a kill between the two renames of a non-exchanging file system leaves.
    target = tmp_path / "out"
    write(target, "kept")
    retired = tmp_path / ".out.old-a1b2c3"
    retired.mkdir()
    target.replace(retired / "out")
    with pytest.raises(ArtifactError, match=r"an interrupted build moved it aside; `kiln clean"):
        read_manifest(target)
    cleared = clean(tmp_path)
    assert cleared.restored == [target.absolute()]
    assert (target / MANIFEST_NAME).read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_clean_leaves_the_staging_of_a_live_build_alone(tmp_path: Path) -> None:
    target = tmp_path / "out"
    release = tmp_path / "release"
    writer = start_writer(target, release, "live")
    try:
        assert clean(tmp_path).removed == []
        assert any(p.name.startswith(".out.building-") for p in tmp_path.iterdir())
    finally:
        release.touch()
        assert writer.wait(timeout=60) == 0
    assert (target / MANIFEST_NAME).read_text() == "live"


def test_kiln_clean_reports_what_it_removed(tmp_path: Path, kiln_main: Callable[..., Any]) -> None:
    (tmp_path / ".out.building-x1y2").mkdir()
    (tmp_path / ".out.building-x1y2" / "model.onnx").write_bytes(bytes(2_000_000))
    # The staging of "out.building-a", not of "out": left alone until that output is cleaned.
    (tmp_path / "out.building-a").mkdir()
    outcome = kiln_main("clean", tmp_path)
    assert outcome.code == 0, outcome.err
    assert "removed 1 leftover folder(s), 2.0 MB" in outcome.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.building-a"]


def test_a_second_writer_waits_for_the_lock_then_commits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "out"
    release = tmp_path / "release"
    writer = start_writer(target, release, "first")
    entered = threading.Event()

    def second() -> None:
        with atomic_directory(target, marker=MANIFEST_NAME) as staging:
            entered.set()
            (staging / MANIFEST_NAME).write_text("second")

    with caplog.at_level(logging.WARNING, logger="modelkiln.outputs"):
        thread = threading.Thread(target=second)
        thread.start()
        deadline = time.monotonic() + 30
        while "waiting for another kiln process" not in caplog.text:
            assert time.monotonic() < deadline, "the second writer never waited"
            time.sleep(0.01)
        assert f"(pid {writer.pid})" in caplog.text
        assert not entered.is_set()
        release.touch()
        assert writer.wait(timeout=60) == 0
        thread.join(timeout=60)
    assert entered.is_set()
    assert (target / MANIFEST_NAME).read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "release"]


def test_three_processes_committing_900_times_to_one_output_all_succeed(tmp_path: Path) -> None:
    target = tmp_path / "out"
    committers = [
        subprocess.Popen([sys.executable, "-c", COMMITTER, str(target), "300"]) for _ in range(3)
    ]
    assert [committer.wait(timeout=120) for committer in committers] == [0, 0, 0]
    pid, index = (target / MANIFEST_NAME).read_text().split("-")
    assert int(pid) in {committer.pid for committer in committers} and index == "299"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_lock_file_goes_with_its_holder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with output_lock(target):
        assert (tmp_path / ".out.lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / ".out.lock").exists()
    with output_lock(target):  # a later holder makes a fresh one
        assert (tmp_path / ".out.lock").is_file()


def test_atomic_file_replaces_only_when_complete(tmp_path: Path) -> None:
    path = tmp_path / "v.npy"
    path.write_bytes(b"earlier")
    with pytest.raises(RuntimeError), atomic_file(path) as staged:
        staged.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"earlier"
    with atomic_file(path) as staged:
        assert staged.suffix == ".npy", "a writer that picks its format by suffix sees it"
        staged.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npy"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "the umask's permissions, not 0600"


@pytest.mark.parametrize(
    ("relative", "folder", "message"),
    [
        ("file/out", True, r"cannot create .*file/out: .*file is a file, not a folder"),
        ("file", True, r"file is a file, not a folder; choose another output location"),
        ("dir", False, r"dir is a folder; give a file name for the output"),
    ],
)
def test_check_writable_names_what_is_in_the_way(
    tmp_path: Path, relative: str, folder: bool, message: str
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(StorageError, match=message):
        check_writable(tmp_path / relative, folder=folder)


def test_a_read_only_place_is_refused_before_anything_is_written(
    small_disk: Callable[..., Path],
) -> None:
    disk = small_disk("1m", read_only=True)
    with pytest.raises(StorageError, match="read-only file system; choose another output"):
        check_writable(disk / "artifacts" / "out", folder=True)
    with pytest.raises(StorageError, match="read-only"), atomic_file(disk / "v.npy"):
        pass


def test_a_full_disk_keeps_the_earlier_directory_and_says_so(
    small_disk: Callable[..., Path],
) -> None:
    disk = small_disk("1m")
    target = disk / "out"
    write(target, "earlier")
    with (
        pytest.raises(StorageError, match=r"no space left on device|is full"),
        atomic_directory(target, marker=MANIFEST_NAME) as staging,
    ):
        (staging / "weights.bin").write_bytes(bytes(2_000_000))
    assert (target / MANIFEST_NAME).read_text() == "earlier"
    assert sorted(p.name for p in disk.iterdir()) == ["out"]


def test_a_full_disk_keeps_the_earlier_file(small_disk: Callable[..., Path]) -> None:
    disk = small_disk("1m")
    path = disk / "v.npy"
    np.save(path, np.arange(10, dtype=np.float32))
    (disk / "filler").write_bytes(bytes(disk_free(disk) - 4096))
    with (
        pytest.raises(StorageError, match=r"v.npy: no space left on device.*; free some space"),
        atomic_file(path) as staged,
        staged.open("wb") as file,
    ):
        np.save(file, np.zeros(100_000, dtype=np.float32))
    assert np.array_equal(np.load(path), np.arange(10, dtype=np.float32))
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "v.npy"]


def disk_free(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def test_an_artifact_gets_the_umask_permissions(tmp_path: Path) -> None:
    write(tmp_path / "out", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask, "not mkdtemp's 0700"
