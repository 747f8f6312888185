"""Backends: one descriptor per backend, and the one registry of them.

A backend (onnxruntime, openvino, coreml, tensorrt, torch, executorch) has one name
everywhere: registry key, runtime name, pip extra, pytest marker, and its own ``[<name>]``
section of a profile. Its descriptor is a `Backend` subclass in its runtime file
(``runtimes/<name>.py``, the file every install of it has, torch-free) and names its
exporter(s) and quantizer module by dotted path, so that reading descriptors imports no
backend library. The build plan, loading, packaging,
``kiln env`` and the test markers ask descriptors: nothing outside a backend's own files
names it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Self

from modelkiln.errors import UnsupportedError, did_you_mean
from modelkiln.profiles import Profile, parse_section
from modelkiln.registry import Registry, load_object

if TYPE_CHECKING:
    from modelkiln.exporters.base import Exporter
    from modelkiln.models.base import ModelFamily
    from modelkiln.records import Manifest
    from modelkiln.runtimes.base import Runtime


@dataclass(frozen=True)
class BackendSettings:
    """A backend's own profile section ([openvino], [tensorrt], ...): a frozen dataclass of
    its keys with their defaults. Runtime-side keys can also be overridden at load time."""

    section: ClassVar[str] = ""

    def check(self, origin: str) -> None:
        """Ranges and combinations of its own keys; raise ProfileError."""

    @classmethod
    def of(cls, profile: Profile) -> Self:
        """The section as `profile` writes it, defaults filled in."""
        return parse_section(
            cls,
            profile.section(cls.section),
            key_path=f"{cls.section}.",
            origin=f"profile '{profile.name}'",
        )


@dataclass(frozen=True)
class NoSettings(BackendSettings):
    """A backend without a section of its own."""


@dataclass(frozen=True)
class ProfileContext:
    """What a backend's (or a scheme handler's) profile check sees: the profile as one
    component sees it, and the choices the plan has resolved."""

    profile: Profile
    origin: str
    family: type[ModelFamily]
    format: str
    runtime: str


class Backend:
    """What a backend is: its names, settings, formats, quantizers and deployment facts."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # The Runtime class that opens its Sessions ("module:Class", or the class itself).
    runtime: ClassVar[str | type[Runtime]]
    # The on-disk formats it writes: format -> its Exporter class (as `runtime`).
    exporters: ClassVar[Mapping[str, str | type[Exporter]]] = {}
    # The module whose import registers its quantization scheme handlers (quantize/<name>.py).
    quantizers: ClassVar[str | None] = None
    settings: ClassVar[type[BackendSettings]] = NoSettings
    # Import names that must be present to run it (tests skip without them).
    packages: ClassVar[tuple[str, ...]] = ()
    # Besides the missing package, what running it needs (a CUDA GPU, macOS).
    needs: ClassVar[str] = ""
    # Distributions whose versions manifests and bench reports record.
    libraries: ClassVar[tuple[str, ...]] = ()
    # Deployment: format it writes -> bundle target -> what the target needs installed.
    deploy: ClassVar[Mapping[str, Mapping[str, tuple[str, ...]]]] = {}
    # Files a runtime opens beside a component's entry, per format ({stem}: the entry's stem);
    # a directory entry brings everything under it instead.
    companions: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    # Schemes its formats do not have, with the reason (the profile error says why).
    unsupported_schemes: ClassVar[Mapping[str, str]] = {}
    # Ray resources a worker that builds or runs it needs (--executor ray), e.g. {"GPU": 1}.
    worker_resources: ClassVar[Mapping[str, float]] = {}

    @classmethod
    def check_profile(cls, context: ProfileContext) -> None:
        """The backend's own rules for a profile that exports to or runs on it."""

    @classmethod
    def requirements(cls, format: str, target: str, profile: Profile) -> tuple[str, ...] | None:
        """What `target` needs installed to run an artifact of `format` (None: it cannot; a
        backend that knows why raises UnsupportedError saying so)."""
        return cls.deploy.get(format, {}).get(target)

    @classmethod
    def runner_readme(cls, format: str, target: str, manifest: Manifest) -> str:
        """Markdown a bundle's README adds under "Run it" (### headings): how `target` runs
        `format` without modelkiln, with the runtime's own API, written from the manifest's
        components. Empty: the README's table of component files is all it says."""
        return ""

    @classmethod
    def runtime_class(cls) -> type[Runtime]:
        runtime: type[Runtime] = load_object(cls.runtime)  # type: ignore[assignment]
        return runtime

    @classmethod
    def exporter_class(cls, format: str) -> type[Exporter]:
        exporter: type[Exporter] = load_object(cls.exporters[format])  # type: ignore[assignment]
        return exporter

    @classmethod
    def import_quantizers(cls) -> None:
        """Register the backend's scheme handlers (importing its quantizer module does)."""
        if cls.quantizers is not None:
            importlib.import_module(cls.quantizers)


BACKENDS: Registry[type[Backend]] = Registry(
    "backend",
    {
        "onnxruntime": "modelkiln.runtimes.onnxruntime:OnnxRuntimeBackend",
        "openvino": "modelkiln.runtimes.openvino:OpenVINOBackend",
        "coreml": "modelkiln.runtimes.coreml:CoreMLBackend",
        "tensorrt": "modelkiln.runtimes.tensorrt:TensorRTBackend",
        "torch": "modelkiln.runtimes.torch:TorchBackend",
        "executorch": "modelkiln.runtimes.executorch:ExecuTorchBackend",
    },
)


def backends() -> list[type[Backend]]:
    return [BACKENDS.get(name) for name in BACKENDS]


def formats() -> list[str]:
    """Every on-disk format a registered backend writes, in registry order."""
    return [format for backend in backends() for format in backend.exporters]


def format_owner(format: str) -> type[Backend]:
    """The backend that writes `format` (its runtime is the format's default)."""
    for backend in backends():
        if format in backend.exporters:
            return backend
    known = formats()
    raise UnsupportedError(
        f"unknown format '{format}'{did_you_mean(format, known)}; known: {', '.join(known)}"
    )


def runtime_backend(name: str) -> type[Backend]:
    """The backend whose runtime is called `name`."""
    if name not in BACKENDS:
        known = ", ".join(sorted(BACKENDS.names()))
        raise UnsupportedError(
            f"unknown runtime '{name}'{did_you_mean(name, BACKENDS.names())}; known: {known}"
        )
    return BACKENDS.get(name)


def resolved_runtime(profile: Profile) -> str:
    """The runtime that runs the profile's artifacts: [runtime] name, where "auto" is the
    runtime of the backend that writes the format."""
    if profile.runtime.name != "auto":
        return profile.runtime.name
    return format_owner(profile.export.format).name


def runtimes_for(format: str) -> list[str]:
    """The runtimes that can run `format`."""
    return [b.name for b in backends() if format in b.runtime_class().formats]


def section_names() -> list[str]:
    """The backend sections a profile may have."""
    return [backend.settings.section for backend in backends() if backend.settings.section]


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendSettings",
    "NoSettings",
    "ProfileContext",
    "backends",
    "format_owner",
    "formats",
    "resolved_runtime",
    "runtime_backend",
    "runtimes_for",
    "section_names",
]
