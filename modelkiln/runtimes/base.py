"""The Session interface every backend implements, and the Runtime that opens sessions.

A Session validates its feeds (names, dtypes, shapes) in `run()` and only then calls the
backend's `_run()`: errors on bad input read the same whatever runs the model.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import numpy as np

from modelkiln.backends import BackendSettings
from modelkiln.errors import ArtifactError, InputError, missing_backend
from modelkiln.profiles import parse_section
from modelkiln.specs import TensorSpec, check_feeds

if TYPE_CHECKING:
    from modelkiln.profiles import Profile

S = TypeVar("S", bound=BackendSettings)

# [precision] compute = "auto": bf16 on CPUs with these `kiln env` features, fp32 elsewhere.
AUTO_COMPUTE = "auto"
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run: the profile's [runtime] section and compute precision, and the runtime
    backend's own section (its settings); all overridable at load time."""

    device: str = "cpu"
    threads: int | None = None
    compute_precision: str = "fp32"
    settings: BackendSettings | None = None

    def backend(self, cls: type[S]) -> S:
        """The runtime's own settings ([openvino], ...); defaults when the profile has none."""
        return self.settings if isinstance(self.settings, cls) else cls()

    @classmethod
    def for_profile(
        cls,
        profile: Profile,
        settings: type[BackendSettings] | None = None,
        component: str | None = None,
    ) -> RuntimeOptions:
        """A component's options (its compute override wins) with `settings` parsed from the
        profile's section of the runtime's backend."""
        view = profile.for_component(component) if component else profile
        return cls(
            device=profile.runtime.device,
            threads=profile.runtime.threads,
            compute_precision=view.precision.compute,
            settings=settings.of(profile) if settings is not None else None,
        )

    def with_overrides(self, **overrides: Any) -> RuntimeOptions:
        """Non-None overrides applied: generic fields by name, the rest to the settings."""
        generic = {f.name for f in fields(self)} - {"settings"}
        given = {k: v for k, v in overrides.items() if v is not None}
        own = {k: v for k, v in given.items() if k not in generic}
        settings = self.settings
        if own:
            known = [f.name for f in fields(settings)] if settings is not None else []
            unknown = sorted(set(own) - set(known))
            if unknown:
                raise TypeError(
                    f"unknown runtime option(s): {', '.join(unknown)}; known: "
                    f"{', '.join(sorted(generic | set(known)))}"
                )
            assert settings is not None  # a key it knows means it has settings
            # Checked as its profile section is: a choice it does not have is refused.
            values = {k: v for k, v in asdict(settings).items() if v is not None}
            settings = parse_section(
                type(settings),
                {**values, **own},
                key_path=f"{settings.section}.",
                origin="load()",
            )
        mine = {k: v for k, v in given.items() if k in generic}
        threads = mine.get("threads")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a whole number >= 1, got {threads!r}")
        return replace(self, **mine, settings=settings)


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
    """One component on one backend. Safe to share between threads: `run` may be called
    from several at once and each call gets its own outputs; a backend whose handle is not
    thread-safe pools its handles (OpenVINO) or serialises its calls (Core ML, TensorRT)."""

    # True when the model file holds its optional inputs' defaults (ONNX initializers a feed
    # overrides): inputs left out are then not fed. Otherwise `run` feeds their zeros.
    holds_defaults: ClassVar[bool] = False

    def __init__(
        self, name: str, inputs: Mapping[str, TensorSpec], outputs: Mapping[str, TensorSpec]
    ) -> None:
        self.name = name
        self.input_specs = dict(inputs)
        self.output_specs = dict(outputs)
        # Seconds of every backend call while a benchmark records them (None: not recording).
        self.call_times: list[float] | None = None
        # The largest batch a bounded dynamic batch axis takes (ExecuTorch plans its memory
        # for it); None: no bound. Pipelines run larger batches in chunks of it.
        self.max_batch: int | None = None
        self._bound: dict[str, np.ndarray] = {}

    @property
    def info(self) -> dict[str, Any]:
        """What the backend actually uses (precision, threads, device), for manifests and info."""
        return {}

    def bind(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Fix some inputs for the calls that follow, until bound again ({}: none): a run-time
        LoRA's matrices, chosen once, not fed per call. Not while runs are in flight."""
        unknown = [name for name in arrays if name not in self.input_specs]
        if unknown:
            raise InputError(
                f"{self.name} has no input(s) {', '.join(map(repr, unknown))} to bind; it has: "
                f"{', '.join(self.input_specs)}"
            )
        self._bound = check_feeds(arrays, {name: self.input_specs[name] for name in arrays})
        self._bind(self._bound)

    def _bind(self, arrays: dict[str, np.ndarray]) -> None:
        """A backend that places bound inputs itself (ONNX Runtime's LoRA adapters) does it
        here; by default `run` feeds them with every call."""

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        checked = check_feeds({**self._bound, **feeds}, self.input_specs)
        if not self.holds_defaults:
            for name, spec in self.input_specs.items():
                if name not in checked:
                    checked[name] = spec.default()
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

    name: ClassVar[str]  # its backend's name (and pip extra)
    formats: ClassVar[frozenset[str]]  # on-disk formats it can run
    compute_precisions: ClassVar[frozenset[str]]
    # True when its CPU kernels compute bf16 in hardware where the CPU has it, faster than
    # fp32 there: what `compute = "auto"` needs (OpenVINO ViT-B/16 at batch 8: 1.98x its fp32
    # on an AMD EPYC with AVX512-BF16 and no AMX; torch's autocast 2.0x).
    native_bf16: ClassVar[bool] = False
    # True when the runtime computes in the types the file stores (onnxruntime): the profile's
    # compute precision must then equal its weights precision.
    compute_follows_weights: ClassVar[bool] = False
    package: ClassVar[str]  # import name of the backend
    distribution: ClassVar[str]  # pip distribution, for versions
    # Opens a model file: (entry, name, inputs, outputs, options) -> Session.
    session_class: ClassVar[Callable[..., Session]]

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec(cls.package) is not None

    @classmethod
    def require(cls) -> None:
        if not cls.is_available():
            raise missing_backend(cls.distribution, cls.name)

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
        return self.session_class(entry, name, inputs, outputs, resolved(options, type(self)))


def resolve_compute(
    precision: str, runtime: type[Runtime], features: Iterable[str] | None = None
) -> str:
    """The precision a runtime computes in on this CPU (`features`: `kiln env`'s): `auto` is
    bf16 where the CPU has bf16 dot products (AVX512-BF16 or AMX) and the runtime uses them,
    fp32 elsewhere; any other precision is itself."""
    if precision != AUTO_COMPUTE:
        return precision
    found = cpu_features() if features is None else frozenset(features)
    return "bf16" if runtime.native_bf16 and found & NATIVE_BF16 else "fp32"


def resolved(options: RuntimeOptions, runtime: type[Runtime]) -> RuntimeOptions:
    """`options` with `compute_precision = "auto"` decided for this CPU."""
    precision = resolve_compute(options.compute_precision, runtime)
    return (
        options
        if precision == options.compute_precision
        else replace(options, compute_precision=precision)
    )


@functools.cache
def cpu_features() -> frozenset[str]:
    from modelkiln.cpu import cpu_info

    return frozenset(cpu_info()["features"])
