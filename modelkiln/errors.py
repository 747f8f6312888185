"""The KilnError family: every failure a user can cause or fix is one of these.

Each class also subclasses the builtin a caller would naturally catch, so that
``except ValueError`` around ``Profile.from_toml`` keeps working. Messages name what
was asked, what was found, and what to do instead; the CLI prints them on one line.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


class BackendUnavailableError(KilnError, ImportError):
    """A backend's package is not installed (the message names the pip extra)."""


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


class ReportError(KilnError, ValueError):
    """A benchmark report or matrix file is unreadable, of another schema, or malformed."""
