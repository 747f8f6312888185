"""The coreml backend: its descriptor and settings, and Core ML sessions
(`coremltools.models.MLModel.predict` on macOS, a clear error elsewhere). It writes the
`coreml` format (an ML Program, model.mlpackage).

coremltools loads a package anywhere but predicts only on macOS (elsewhere `predict` raises a
bare Exception); the session refuses before that, naming the requirement. The compute units
are not stored in the package, so they come from the manifest's profile.
"""

from __future__ import annotations

import logging
import platform
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from modelkiln.backends import Backend, BackendSettings, ProfileContext
from modelkiln.errors import ArtifactError, UnsupportedError
from modelkiln.runtimes.base import Runtime, RuntimeOptions, Session
from modelkiln.specs import TensorSpec

if TYPE_CHECKING:
    from modelkiln.profiles import Profile

# Our names -> coremltools.ComputeUnit members.
COMPUTE_UNITS = {
    "all": "ALL",
    "cpu_and_ne": "CPU_AND_NE",
    "cpu_and_gpu": "CPU_AND_GPU",
    "cpu_only": "CPU_ONLY",
}
MIN_MACOS = (13, 0)  # ML Programs with the ops our exports use
# A Core ML deployment target -> the (iOS, macOS) releases of that ML Program spec: a bundle's
# target runs an ML Program on the OS its [coreml] target names, or later.
COREML_OS = {
    "iOS16": (16, 13),
    "macOS13": (16, 13),
    "iOS17": (17, 14),
    "macOS14": (17, 14),
    "iOS18": (18, 15),
    "macOS15": (18, 15),
}


@dataclass(frozen=True)
class CoreMLSettings(BackendSettings):
    """[coreml]: the ML Program of format 'coreml'."""

    section: ClassVar[str] = "coreml"
    # The oldest OS the .mlpackage loads on; decides the ops compression may use (int4,
    # per-block scales and grouped lookup tables need iOS18 / macOS15).
    target: Literal["iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15"] = "iOS17"
    # Where Core ML may run it; not stored in the package, so the manifest carries it.
    compute_units: Literal["all", "cpu_and_ne", "cpu_and_gpu", "cpu_only"] = "all"
    # Flexible dims ([shapes] dynamic batch / resolution): a list of shapes Core ML compiles
    # for each (what the Neural Engine runs), or any size within the bounds (CPU / GPU only).
    flexible_shapes: Literal["enumerated", "range"] = "enumerated"


def import_coremltools() -> ModuleType:
    """coremltools without its import-time warnings (untested torch / scikit-learn versions,
    no native prediction library off macOS): none of them is for our users."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools

    return coremltools


def platform_problem() -> str | None:
    """Why this machine cannot run Core ML predictions, or None on a recent enough macOS."""
    if sys.platform != "darwin":
        return (
            f"Core ML prediction needs macOS {MIN_MACOS[0]}+ (this is {sys.platform}); run "
            "the artifact on a Mac, or build an onnx/openvino profile for this machine"
        )
    release = platform.mac_ver()[0]
    version = tuple(int(part) for part in release.split(".")[:2] if part.isdigit())
    if version and version < MIN_MACOS:
        return f"Core ML prediction of ML Programs needs macOS {MIN_MACOS[0]}+, this is {release}"
    return None


def coreml_feed(array: np.ndarray) -> np.ndarray:
    """What the program takes for one of our feeds: int32 for integers, (1,) for a 0-d."""
    if array.ndim == 0:
        array = array.reshape(1)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int32)
    return array


class CoreMLSession(Session):
    def __init__(
        self,
        entry: Path,
        name: str,
        inputs: Mapping[str, TensorSpec],
        outputs: Mapping[str, TensorSpec],
        options: RuntimeOptions,
    ) -> None:
        super().__init__(name, inputs, outputs)
        problem = platform_problem()
        if problem is not None:
            raise UnsupportedError(f"{name}: {problem}")
        ct = import_coremltools()
        self._compute_units = options.backend(CoreMLSettings).compute_units
        try:
            self._model = ct.models.MLModel(
                str(entry),
                compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[self._compute_units]),
            )
        except Exception as error:  # coremltools raises bare Exceptions and RuntimeErrors
            raise ArtifactError(
                f"Core ML cannot load {entry}: {str(error).strip().splitlines()[0]}; the package "
                "may be corrupted: run `kiln verify` or rebuild"
            ) from error
        self._lock = threading.Lock()
        description = self._model.get_spec().description
        self._check_backend_names(
            [feature.name for feature in description.input],
            [feature.name for feature in description.output],
        )

    @property
    def info(self) -> dict[str, Any]:
        return {"runtime": "coreml", "device": "apple", "compute_units": self._compute_units}

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        # coremltools documents no thread safety for MLModel.predict: one call at a time.
        with self._lock:
            results = self._model.predict(
                {name: coreml_feed(array) for name, array in feeds.items()}
            )
        return {
            name: np.asarray(results[name], dtype=self.output_specs[name].dtype)
            for name in output_names
        }

    def close(self) -> None:
        self._model = None


class CoreMLRuntime(Runtime):
    name = "coreml"
    formats: ClassVar[frozenset[str]] = frozenset({"coreml"})
    compute_precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16"})
    # The program computes in the precision it was converted with (its weights' precision).
    compute_follows_weights = True
    package = "coremltools"
    distribution = "coremltools"
    session_class = CoreMLSession

    @classmethod
    def unavailable_reason(cls, options: RuntimeOptions) -> str | None:
        return platform_problem()


class CoreMLBackend(Backend):
    name = "coreml"
    summary = "Core ML ML Programs (.mlpackage) for iOS and macOS; prediction needs macOS"
    runtime = "modelkiln.runtimes.coreml:CoreMLRuntime"
    exporters: ClassVar[Mapping[str, str]] = {"coreml": "modelkiln.exporters.coreml:CoreMLExporter"}
    quantizers = "modelkiln.quantize.coreml"
    settings = CoreMLSettings
    packages = ("coremltools",)
    needs = f"macOS {MIN_MACOS[0]}+ (converting works anywhere)"
    libraries = ("coremltools",)
    deploy: ClassVar[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
        "coreml": {"ios": ("iOS>=17",), "macos": ("macOS>=14",)}  # the default target, iOS17
    }
    unsupported_schemes: ClassVar[Mapping[str, str]] = {
        "int8-static": "Core ML calibrates activations by running the model, which needs "
        "macOS: use int8-weights",
    }

    @classmethod
    def check_profile(cls, context: ProfileContext) -> None:
        profile = context.profile
        # coremltools builds group norm's reshape from the batch size as a constant.
        group_norm = "group_norm" in context.family.notable_ops
        if context.format == "coreml" and profile.shapes.dynamic_batch and group_norm:
            raise UnsupportedError(
                f"{context.origin}: Core ML's converter cannot give the group-norm components "
                f"of {context.family.name} models (UNet, VAE) a flexible batch; set "
                "shapes.dynamic_batch = false and shapes.batch_size to the images per call"
            )

    @classmethod
    def requirements(cls, format: str, target: str, profile: Profile) -> tuple[str, ...] | None:
        """The OS release of the deployment target the artifact was built for."""
        if format != "coreml" or target not in ("ios", "macos"):
            return None
        ios, macos = COREML_OS[CoreMLSettings.of(profile).target]
        return (f"iOS>={ios}",) if target == "ios" else (f"macOS>={macos}",)
