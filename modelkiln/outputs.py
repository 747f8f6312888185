"""Outputs that appear whole or not at all, and that no interrupted run leaves behind.

- atomic_directory: an artifact, an unpacked bundle or a trained data-set model is built
  in a hidden staging sibling and swapped with its target in one rename; the earlier
  directory survives every failure, and a reader never finds the target missing.
- atomic_file: embeddings, images, reports and caches are written beside their target and
  renamed over it; a full disk leaves the earlier file as it was.
- A directory's writer holds a lock file beside it (`.NAME.lock`): two builds of one output
  run one after the other. Holding the lock, a writer knows that any staging beside its
  target is from a killed run, and clears it (restoring a target that a kill left moved
  aside, where the file system cannot swap in one rename).

Torch-free, like everything a runtime imports. POSIX only (flock(2)), as are the deployment
targets (Linux, Android, macOS, iOS).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from modelkiln.errors import (
    ArtifactError,
    KilnError,
    StorageError,
    first_line,
    require_utf8_path,
    storage_error,
)

logger = logging.getLogger(__name__)

STAGING = "building"
RETIRED = "old"
LOCK_SUFFIX = ".lock"
# Below this much free space a failure is reported as the full disk it almost surely is
# (converters report ENOSPC as anything from "iostream error" to a protobuf failure).
NEARLY_FULL_BYTES = 16 << 20
# The random part of a staging name: what follows ".NAME.building-" for NAME, and nothing
# longer (".a.building-x.building-y" is the staging of "a.building-x", not of "a").
_RANDOM_PART = re.compile(r"[A-Za-z0-9_]+")


def prepare_directory(path: Path) -> None:
    """Create `path` and its parents, or say in one line why nothing can be written there."""
    check_writable(path, folder=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise storage_error(error, path) from error


def check_writable(path: Path, *, folder: bool) -> Path:
    """Before the work starts: can `path` (a folder or a file) be written? Creates nothing,
    so a run that fails later leaves no empty folder. Returns the absolute path."""
    path = Path(path).absolute()
    require_utf8_path(path, StorageError, "choose another name for the output")
    if path.exists() and folder and not path.is_dir():
        raise StorageError(f"{path} is a file, not a folder; choose another output location")
    if path.is_dir() and not folder:
        raise StorageError(f"{path} is a folder; give a file name for the output")
    existing = path if folder and path.exists() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise StorageError(
            f"cannot create {path}: {existing} is a file, not a folder; choose another path"
        )
    # access() also answers EROFS for root, whom permissions do not stop.
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(
            f"cannot write into {existing}: permission denied or a read-only file system; "
            "choose another output location"
        )
    return path


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A hidden temporary sibling of `path` (with its suffix: writers pick a format by it),
    renamed over `path` when the block succeeds and removed when it fails."""
    path = Path(path)
    prepare_directory(path.parent)
    if path.is_dir():
        raise StorageError(f"{path} is a folder; give a file name for the output")
    staged = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        # "xb", not mkstemp: the file gets the umask's permissions, not 0600.
        staged.open("xb").close()
        yield staged
        with staged.open("rb+") as written:
            os.fsync(written.fileno())  # on disk before it replaces the earlier file
        staged.replace(path)
    except Exception as error:
        failure = _failure(error, path)
        if failure is None:
            raise
        raise failure from error
    finally:
        staged.unlink(missing_ok=True)


def write_file_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as staged:
        staged.write_bytes(data)


@contextlib.contextmanager
def atomic_directory(target: Path, *, marker: str | None) -> Iterator[Path]:
    """Yield an empty staging directory that replaces `target` when the block succeeds.

    An existing `target` is replaced only if it holds the file `marker` (it is one of ours)
    or is empty: it may hold the user's files (marker None: a folder of ours, such as a
    cache entry). The lock on `target` is held throughout.
    """
    target = Path(target).absolute()
    prepare_directory(target.parent)
    with output_lock(target), replacing(target, marker=marker) as staging:
        yield staging


@contextlib.contextmanager
def replacing(target: Path, *, marker: str | None) -> Iterator[Path]:
    """atomic_directory for a caller that already holds target's output_lock."""
    target = Path(target).absolute()
    clear_leftovers(target)
    _check_replaceable(target, marker)
    staging = _sibling(target, STAGING)
    try:
        yield staging
        _commit(staging, target)
    except BaseException as error:
        failure = _failure(error, target) if isinstance(error, Exception) else None
        shutil.rmtree(staging, ignore_errors=True)
        if failure is not None:
            raise failure from error
        raise


def _failure(error: Exception, path: Path) -> StorageError | None:
    """The one-line error for a failed write of `path`, or None to let `error` through.

    A full disk is said as such whatever the writer raised: converters report it as
    anything from "iostream error" to a short write without an errno.
    """
    if isinstance(error, StorageError):
        return None
    if getattr(error, "errno", None) != errno.ENOSPC and _nearly_full(path.parent):
        return StorageError(
            f"{path}: no space left on device ({first_line(error)}); "
            "free some space or choose another location"
        )
    if isinstance(error, OSError) and not isinstance(error, KilnError):
        return storage_error(error, path)
    return None


@contextlib.contextmanager
def output_lock(target: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold `.NAME.lock` beside target: another writer of target waits until released.
    Yields True once held; with wait=False, False at once when another process holds it.

    The lock file is removed on release, so none is left behind; a waiter that then holds
    a removed file's lock notices (its inode is not the path's) and locks the new one.
    """
    target = Path(target).absolute()
    lock_path = target.parent / f".{target.name}{LOCK_SUFFIX}"
    handle = _acquire(lock_path, target, wait=wait)
    if handle is None:
        yield False
        return
    try:
        yield True
    finally:
        lock_path.unlink(missing_ok=True)  # still holding it: nobody can hold this inode now
        os.close(handle)


def _acquire(lock_path: Path, target: Path, *, wait: bool) -> int | None:
    while True:
        try:
            handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise storage_error(error, lock_path) from error
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(handle)
                    return None
                holder = os.pread(handle, 32, 0).decode("ascii", "replace").strip() or "?"
                logger.warning(
                    "waiting for another kiln process (pid %s) to finish writing %s",
                    holder,
                    target,
                )
                fcntl.flock(handle, fcntl.LOCK_EX)
            if _same_file(handle, lock_path):
                os.ftruncate(handle, 0)
                os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
                return handle
        except BaseException:
            os.close(handle)
            raise
        os.close(handle)


def _same_file(handle: int, path: Path) -> bool:
    try:
        return os.fstat(handle).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


@dataclass
class Cleared:
    """What clear_leftovers found: staging of killed runs removed, targets restored."""

    removed: list[Path] = field(default_factory=list)
    restored: list[Path] = field(default_factory=list)
    freed_bytes: int = 0


def clear_leftovers(target: Path) -> Cleared:
    """Remove target's staging left by killed runs, and restore a target that a kill left
    moved aside. Call it holding target's lock: then no live run owns that staging."""
    cleared = Cleared()
    for kind in (RETIRED, STAGING):
        for leftover in leftovers(target, kind):
            kept = leftover / target.name
            if kind == RETIRED and kept.is_dir() and not target.exists():
                kept.replace(target)
                logger.warning("restored %s, which an interrupted build had moved aside", target)
                cleared.restored.append(target)
            cleared.freed_bytes += _size(leftover)
            shutil.rmtree(leftover, ignore_errors=True)
            cleared.removed.append(leftover)
    if cleared.removed:
        logger.info("removed %d leftovers of killed runs beside %s", len(cleared.removed), target)
    return cleared


def clean(directory: Path) -> Cleared:
    """clear_leftovers for every output in `directory` that has some and no live writer."""
    cleared = Cleared()
    targets = {
        Path(directory) / name
        for path in Path(directory).glob(".*")
        if (name := _leftover_target(path.name)) is not None
    }
    for target in sorted(targets):
        # A live run holds its output's lock: its staging is not a leftover.
        with output_lock(target, wait=False) as held:
            if held:
                found = clear_leftovers(target)
                cleared.removed += found.removed
                cleared.restored += found.restored
                cleared.freed_bytes += found.freed_bytes
    return cleared


def leftovers(target: Path, kind: str) -> list[Path]:
    """The staging (kind STAGING) or moved-aside (RETIRED) folders of target beside it."""
    prefix = f".{target.name}.{kind}-"
    return sorted(
        path
        for path in target.parent.glob(f".*.{kind}-*")
        if path.name.startswith(prefix)
        and _RANDOM_PART.fullmatch(path.name[len(prefix) :])
        and path.is_dir()
    )


def _leftover_target(name: str) -> str | None:
    """The target NAME of a staging or retired folder `.NAME.KIND-RANDOM`, else None."""
    for kind in (STAGING, RETIRED):
        head, separator, random_part = name.rpartition(f".{kind}-")
        if separator and head.startswith(".") and _RANDOM_PART.fullmatch(random_part):
            return head[1:] or None
    return None


def _sibling(target: Path, kind: str) -> Path:
    # mkdir, not mkdtemp: the artifact gets the umask's permissions, not 0700.
    while True:
        path = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as error:
            raise storage_error(error, target.parent) from error


def _check_replaceable(target: Path, marker: str | None) -> None:
    if target.exists() and not target.is_dir():
        raise ArtifactError(f"output {target} exists and is not a directory; choose another -o")
    if marker is None or not target.is_dir():
        return
    if any(target.iterdir()) and not (target / marker).is_file():
        raise ArtifactError(
            f"output {target} exists, is not empty and is not a modelkiln output "
            f"(it has no {marker}); "
            "choose another -o or remove it"
        )


def _commit(staging: Path, target: Path) -> None:
    if not target.exists():
        staging.replace(target)
    elif _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the earlier target
    else:
        # Two renames: a kill between them leaves target in .NAME.old-*, which the next
        # writer (or `kiln clean`) puts back.
        retired = _sibling(target, RETIRED)
        target.replace(retired / target.name)
        staging.replace(target)
        shutil.rmtree(retired, ignore_errors=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    status = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if status == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a file system without the exchange (some network and FUSE mounts)
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


__all__ = [
    "Cleared",
    "atomic_directory",
    "atomic_file",
    "check_writable",
    "clean",
    "clear_leftovers",
    "leftovers",
    "output_lock",
    "prepare_directory",
    "replacing",
    "write_file_atomic",
]
