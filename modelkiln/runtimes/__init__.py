"""Runtimes by name; the same name is the pip extra, the profile value and the pytest marker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelkiln.registry import Registry
from modelkiln.runtimes.base import Runtime, RuntimeOptions, Session

if TYPE_CHECKING:
    from modelkiln.profiles import Profile

RUNTIMES: Registry[type[Runtime]] = Registry(
    "runtime",
    {
        "torch": "modelkiln.runtimes.torch:TorchRuntime",
        "onnxruntime": "modelkiln.runtimes.onnxruntime:OnnxRuntime",
        "openvino": "modelkiln.runtimes.openvino:OpenVINORuntime",
        "coreml": "modelkiln.runtimes.coreml:CoreMLRuntime",
        "tensorrt": "modelkiln.runtimes.tensorrt:TensorRTRuntime",
    },
)


def runs_here(profile: Profile) -> bool:
    """Whether this machine can run the profile's artifacts (bench scripts pick by it)."""
    runtime = RUNTIMES.get(profile.runtime_name)
    options = RuntimeOptions.from_profile(profile.to_dict())
    return runtime.is_available() and runtime.unavailable_reason(options) is None


__all__ = ["RUNTIMES", "Runtime", "RuntimeOptions", "Session", "runs_here"]
