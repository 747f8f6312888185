"""Core ML sessions: `coremltools.models.MLModel.predict` on macOS, a clear error elsewhere.

coremltools loads a package anywhere but predicts only on macOS (elsewhere `predict` raises a
bare Exception); the session refuses before that, naming the requirement. The compute units
are not stored in the package, so they come from the manifest's profile.
"""

from __future__ import annotations

import logging
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from modelkiln.errors import ArtifactError, UnsupportedError
from modelkiln.runtimes.base import Runtime, RuntimeOptions, Session
from modelkiln.specs import TensorSpec

# Our names -> coremltools.ComputeUnit members.
COMPUTE_UNITS = {
    "all": "ALL",
    "cpu_and_ne": "CPU_AND_NE",
    "cpu_and_gpu": "CPU_AND_GPU",
    "cpu_only": "CPU_ONLY",
}
MIN_MACOS = (13, 0)  # ML Programs with the ops our exports use


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
        self._compute_units = options.compute_units
        try:
            self._model = ct.models.MLModel(
                str(entry),
                compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[options.compute_units]),
            )
        except Exception as error:  # coremltools raises bare Exceptions and RuntimeErrors
            raise ArtifactError(
                f"Core ML cannot load {entry}: {str(error).strip().splitlines()[0]}; the package "
                "may be corrupted: run `kiln verify` or rebuild"
            ) from error
        description = self._model.get_spec().description
        self._check_backend_names(
            [feature.name for feature in description.input],
            [feature.name for feature in description.output],
        )

    @property
    def info(self) -> dict[str, Any]:
        return {"runtime": "coreml", "device": "apple", "compute_units": self._compute_units}

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        results = self._model.predict({name: coreml_feed(array) for name, array in feeds.items()})
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
    extra = "coreml"
    session_class = CoreMLSession

    @classmethod
    def unavailable_reason(cls, options: RuntimeOptions) -> str | None:
        return platform_problem()
