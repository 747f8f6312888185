"""The KilnError family: every failure a user can cause or fix is one of these.

Each class also subclasses the builtin a caller would naturally catch, so that
``except ValueError`` around ``Profile.from_toml`` keeps working. Messages name what
was asked, what was found, and what to do instead; the CLI prints them on one line.
"""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Iterable, Mapping
from pathlib import Path


class KilnError(Exception):
    """Base class of every user-facing modelkiln failure."""


class ProfileError(KilnError, ValueError):
    """A profile is malformed, has unknown keys, or asks for an impossible combination."""


class UnsupportedError(KilnError, NotImplementedError):
    """A combination modelkiln does not support (format x precision, model family, ...)."""


class SourceError(KilnError, ValueError):
    """A model source cannot be resolved or loaded."""


class ExportError(KilnError, RuntimeError):
    """Export of a component failed."""


class QuantizationError(KilnError, RuntimeError):
    """A quantization tool failed, or quantized nothing where the profile asked for it."""


class ValidationError(KilnError, RuntimeError):
    """An exported component missed the profile's tolerance against its torch reference."""


class ArtifactError(KilnError, OSError):
    """An artifact directory is missing, incomplete or corrupted."""


class IntegrityError(ArtifactError):
    """A file of an artifact or bundle does not match its manifest: `kiln verify`'s finding."""


class StorageError(KilnError, OSError):
    """A file or folder cannot be read or written: no space, no permission, not a folder, ..."""


class BackendUnavailableError(KilnError, ImportError):
    """A backend's package is not installed (the message names the pip extra)."""


class ClusterError(KilnError, RuntimeError):
    """A Ray cluster cannot be reached, cannot run a task, or a task did not finish in time."""


class InputError(KilnError, ValueError):
    """Bad input to a session or pipeline: unreadable image, wrong shape or dtype, ..."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def missing_backend(package: str, extra: str) -> BackendUnavailableError:
    """The error for an absent backend package, naming the pip extra that brings it."""
    return BackendUnavailableError(
        f"{package} is not installed; install it with: pip install 'modelkiln[{extra}]'"
    )


def first_line(error: BaseException) -> str:
    """An exception's first line (libraries' messages run to pages), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_STORAGE_FIXES = {
    errno.ENOSPC: "free some space or choose another location",
    errno.EDQUOT: "free some space or choose another location",
    errno.EACCES: "choose a location you can write to",
    errno.EPERM: "choose a location you can write to",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EEXIST: "a file is in the way; choose another path",
    errno.EISDIR: "it is a folder; give a file name",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter name",
}


def storage_error(error: OSError, path: str | Path | None = None) -> StorageError:
    """The one-line error for an OSError met while reading or writing `path`."""
    where = error.filename if error.filename is not None else path
    reason = (error.strerror or str(error) or type(error).__name__).lower()
    fix = _STORAGE_FIXES.get(error.errno or 0, "check the path and the disk")
    return StorageError(f"{where}: {reason}; {fix}")


def require_utf8_path(path: Path, error: type[KilnError], fix: str) -> None:
    """Refuse a path that is not UTF-8: the Rust and C++ libraries (safetensors, tokenizers,
    ONNX Runtime) take UTF-8 paths only, and would fail deep inside a build."""
    try:
        str(path.absolute()).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path.absolute()).decode("utf-8", "backslashreplace")
        raise error(
            f"the path {shown} is not valid UTF-8, which the model libraries cannot open; {fix}"
        ) from None


class ReportError(KilnError, ValueError):
    """A benchmark report or matrix file is unreadable, of another schema, or malformed."""


def check_known_keys(data: Iterable[str], known: Iterable[str], where: str) -> None:
    """A matrix file table's keys: the first unknown one is a ReportError naming the closest."""
    choices = sorted(known)
    for key in data:
        if key not in choices:
            raise ReportError(
                f"{where}: unknown key '{key}'{did_you_mean(key, choices)}; known: "
                f"{', '.join(choices)}"
            )


def error_record(error: KilnError) -> dict[str, str]:
    """A KilnError as JSON-able data: how an isolated child or a cluster task reports it."""
    return {"type": type(error).__name__, "message": str(error)}


def from_record(record: Mapping[str, str], prefix: str = "") -> KilnError:
    """The error_record back as the same class (KilnError for a name it does not know)."""
    kind = globals().get(record["type"])
    if not (isinstance(kind, type) and issubclass(kind, KilnError)):
        kind = KilnError
    return kind(prefix + record["message"])
