"""Exporters by on-disk format."""

from __future__ import annotations

from modelkiln.exporters.base import Exporter
from modelkiln.registry import Registry

EXPORTERS: Registry[type[Exporter]] = Registry(
    "format",
    {
        "onnx": "modelkiln.exporters.onnx:OnnxExporter",
        "openvino": "modelkiln.exporters.openvino:OpenVINOExporter",
        "coreml": "modelkiln.exporters.coreml:CoreMLExporter",
        "tensorrt": "modelkiln.exporters.tensorrt:TensorRTExporter",
        "torch": "modelkiln.exporters.torch:TorchExporter",
    },
)

__all__ = ["EXPORTERS", "Exporter"]
