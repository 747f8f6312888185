"""Runtimes: each backend's Session and Runtime live in runtimes/<backend>.py, beside its
descriptor (modelkiln.backends); the backend's name is the runtime's name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelkiln.backends import resolved_runtime, runtime_backend
from modelkiln.runtimes.base import Runtime, RuntimeOptions, Session

if TYPE_CHECKING:
    from modelkiln.profiles import Profile


def runtime_named(name: str) -> type[Runtime]:
    """The Runtime class of the backend called `name`; unknown names raise with the list."""
    return runtime_backend(name).runtime_class()


def runs_here(profile: Profile) -> bool:
    """Whether this machine can run the profile's artifacts (bench scripts pick by it)."""
    backend = runtime_backend(resolved_runtime(profile))
    runtime = backend.runtime_class()
    options = RuntimeOptions.for_profile(profile, backend.settings)
    return runtime.is_available() and runtime.unavailable_reason(options) is None


__all__ = ["Runtime", "RuntimeOptions", "Session", "runs_here", "runtime_named"]
