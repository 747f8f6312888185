"""Runtimes by name; the same name is the pip extra, the profile value and the pytest marker."""

from __future__ import annotations

from modelkiln.registry import Registry
from modelkiln.runtimes.base import Runtime, RuntimeOptions, Session

RUNTIMES: Registry[type[Runtime]] = Registry(
    "runtime",
    {
        "torch": "modelkiln.runtimes.torch:TorchRuntime",
        "onnxruntime": "modelkiln.runtimes.onnxruntime:OnnxRuntime",
        "openvino": "modelkiln.runtimes.openvino:OpenVINORuntime",
    },
)

__all__ = ["RUNTIMES", "Runtime", "RuntimeOptions", "Session"]
