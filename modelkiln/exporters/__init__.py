"""Exporters by on-disk format (onnx, openvino, torch); tensorrt and coreml join later."""

from __future__ import annotations

from modelkiln.exporters.base import Exporter
from modelkiln.registry import Registry

EXPORTERS: Registry[type[Exporter]] = Registry(
    "format",
    {
        "onnx": "modelkiln.exporters.onnx:OnnxExporter",
        "openvino": "modelkiln.exporters.openvino:OpenVINOExporter",
        "torch": "modelkiln.exporters.torch:TorchExporter",
    },
)

__all__ = ["EXPORTERS", "Exporter"]
