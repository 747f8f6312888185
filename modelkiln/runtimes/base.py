"""The Session interface every backend implements, and the Runtime that opens sessions.

A Session validates its feeds (names, dtypes, shapes) in `run()` and only then calls the
backend's `_run()`: errors on bad input read the same whatever runs the model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import numpy as np

from modelkiln.errors import ArtifactError, InputError, missing_backend
from modelkiln.specs import TensorSpec, check_feeds


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run: the profile's [runtime] section plus its compute precision, overridable."""

    device: str = "cpu"
    threads: int | None = None
    performance_hint: str | None = None
    graph_optimization: str = "all"
    compute_precision: str = "fp32"
    compute_units: str = "all"  # coreml: all | cpu_and_ne | cpu_and_gpu | cpu_only

    @classmethod
    def from_profile(
        cls, profile: Mapping[str, Any], component: str | None = None
    ) -> RuntimeOptions:
        """From a profile's dict (as kiln.json keeps it); a component's compute override wins."""
        runtime = profile.get("runtime", {})
        compute = profile.get("precision", {}).get("compute", "fp32")
        overrides = profile.get("components", {}).get(component, {}) if component else {}
        return cls(
            device=runtime.get("device", "cpu"),
            threads=runtime.get("threads"),
            performance_hint=runtime.get("performance_hint"),
            graph_optimization=runtime.get("graph_optimization", "all"),
            compute_precision=overrides.get("compute") or compute,
            compute_units=profile.get("coreml", {}).get("compute_units", "all"),
        )


class Closeable:
    """`with` support for anything holding backend resources: close() on exit."""

    def close(self) -> None:
        """Release backend resources; the object is unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Session(Closeable, ABC):
    def __init__(
        self, name: str, inputs: Mapping[str, TensorSpec], outputs: Mapping[str, TensorSpec]
    ) -> None:
        self.name = name
        self.input_specs = dict(inputs)
        self.output_specs = dict(outputs)
        # Seconds of every backend call while a benchmark records them (None: not recording).
        self.call_times: list[float] | None = None

    @property
    def info(self) -> dict[str, Any]:
        """What the backend actually uses (precision, threads, device), for manifests and info."""
        return {}

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        checked = check_feeds(feeds, self.input_specs)
        wanted = list(output_names) if output_names is not None else list(self.output_specs)
        unknown = [n for n in wanted if n not in self.output_specs]
        if unknown:
            raise InputError(
                f"{self.name} has no output(s) {', '.join(map(repr, unknown))}; "
                f"it has: {', '.join(self.output_specs)}"
            )
        started = time.perf_counter()
        results = self._run(checked, wanted)
        if self.call_times is not None:
            self.call_times.append(time.perf_counter() - started)
        return {name: results[name] for name in wanted}

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run the backend on validated feeds; return at least the requested outputs."""

    def _check_backend_names(self, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        """The model file must declare the names the manifest promises."""
        if set(inputs) != set(self.input_specs) or not set(self.output_specs) <= set(outputs):
            raise ArtifactError(
                f"{self.name}: the model file has inputs {sorted(inputs)} and outputs "
                f"{sorted(outputs)}, but the manifest says {sorted(self.input_specs)} -> "
                f"{sorted(self.output_specs)}; rebuild the artifact"
            )


class Runtime(ABC):
    """Opens Sessions for one backend; class attributes feed the support matrix."""

    name: ClassVar[str]
    formats: ClassVar[frozenset[str]]  # on-disk formats it can run
    compute_precisions: ClassVar[frozenset[str]]
    # True when the runtime computes in the types the file stores (onnxruntime): the profile's
    # compute precision must then equal its weights precision.
    compute_follows_weights: ClassVar[bool] = False
    package: ClassVar[str]  # import name of the backend
    distribution: ClassVar[str]  # pip distribution, for versions
    extra: ClassVar[str]  # the modelkiln extra that installs it
    # Opens a model file: (entry, name, inputs, outputs, options) -> Session.
    session_class: ClassVar[Callable[..., Session]]

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec(cls.package) is not None

    @classmethod
    def require(cls) -> None:
        if not cls.is_available():
            raise missing_backend(cls.distribution, cls.extra)

    @classmethod
    def unavailable_reason(cls, options: RuntimeOptions) -> str | None:
        """Why this machine cannot run the runtime's models at all (Core ML off macOS), or
        None. The build then records its validation as not run instead of failing."""
        return None

    @classmethod
    def version(cls) -> str | None:
        try:
            return importlib.metadata.version(cls.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    def open(
        self,
        entry: Path,
        name: str,
        inputs: Mapping[str, TensorSpec],
        outputs: Mapping[str, TensorSpec],
        options: RuntimeOptions,
    ) -> Session:
        """Open the component whose main file (or directory) is `entry`."""
        self.require()
        return self.session_class(entry, name, inputs, outputs, options)
