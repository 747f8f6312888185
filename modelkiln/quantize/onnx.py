"""ONNX quantization with onnxruntime.quantization."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import QuantizationError
from modelkiln.exporters.base import first_line

if TYPE_CHECKING:
    from modelkiln.profiles import QuantizationSettings

INTEGER_TYPES = {2, 3}  # onnx.TensorProto.UINT8, INT8


def int8_dynamic(entry: Path, settings: QuantizationSettings) -> dict[str, Any]:
    """int8 weights, activations quantized at run time (MatMulInteger / DynamicQuantizeLinear)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    data = entry.with_name(f"{entry.stem}.onnx_data")
    external = data.is_file()
    before = _size(entry, data)
    with tempfile.TemporaryDirectory(dir=entry.parent) as scratch:
        output = Path(scratch) / entry.name
        try:
            quantize_dynamic(
                entry,
                output,
                weight_type=QuantType.QInt8,
                per_channel=settings.per_channel,
                use_external_data_format=external,
            )
        except Exception as error:  # the quantizer raises many unrelated types
            raise QuantizationError(
                f"onnxruntime int8-dynamic quantization failed: {first_line(error)}"
            ) from error
        model = onnx.load(str(output))
    # Our layout again: one model.onnx_data beside model.onnx when the export had one.
    data.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(entry),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data.name,
    )
    quantized = [t for t in model.graph.initializer if t.data_type in INTEGER_TYPES]
    ops = Counter(node.op_type for node in model.graph.node)
    return {
        "quantized_weights": sum(1 for t in quantized if len(t.dims) >= 2),
        "ops": {op: ops[op] for op in ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear")},
        "per_channel": settings.per_channel,
        "bytes_before": before,
        "bytes_after": _size(entry, data),
    }


def _size(entry: Path, data: Path) -> int:
    return entry.stat().st_size + (data.stat().st_size if data.is_file() else 0)
