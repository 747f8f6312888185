"""int4 weights (MatMulNBits) quantized while a streamed ONNX export is written.

A component larger than memory (SD 3.5 Large's transformer: 32 GB in fp32) is exported with
its weights read from the checkpoint only as the file is saved (exporters/onnx.py). The
scheme handler (quantize/onnx.py: int4_weights) cannot take it: onnxruntime's
MatMulNBitsQuantizer loads the whole fp32 model. Here the same rewrite is made on the
weightless graph instead: each MatMul with a constant 2-D weight becomes the MatMulNBits node
the quantizer makes (same attributes, initializer names and order), and its packed weight,
scales and zero points are lazy tensors computed by onnxruntime's own kernel
(`quantize_matmul_4bits`) when the saver reaches them, one weight at a time. The file is the
one the quantizer writes from the fp32 export (tests/quantize/test_onnx_streamed.py checks
them byte for byte).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from modelkiln.quantize.onnx import count_ops
from modelkiln.quantize.schemes import Int4Weights

MICROSOFT = "com.microsoft"
PACK = 2  # 4-bit values per byte


def quantize_matmuls_as_written(
    model: Any, settings: Int4Weights, accuracy_level: int
) -> dict[str, Any]:
    """Rewrite `model` (an onnx_ir.Model) in place; returns the manifest's record."""
    import onnx_ir

    graph = model.graph
    rewritten = 0
    padded = 0
    # A weight used by several MatMuls (tied) is quantized once and shared.
    made: dict[str, list[Any]] = {}
    for node in list(graph):
        weight = _constant_weight(node)
        if weight is None:
            continue
        rows, cols = (int(size) for size in weight.const_value.shape)
        if weight.name not in made:
            made[weight.name] = _quantized_initializers(graph, weight, settings)
        inputs = [node.inputs[0], *made[weight.name]]
        attributes = {"K": rows, "N": cols, "bits": 4, "block_size": settings.group_size}
        if accuracy_level:
            attributes["accuracy_level"] = accuracy_level
        replacement = onnx_ir.node(
            "MatMulNBits",
            inputs,
            attributes,
            domain=MICROSOFT,
            num_outputs=1,
            name=f"{node.name}_Q4" if node.name else None,
        )
        onnx_ir.convenience.replace_nodes_and_values(
            graph, node, [node], [replacement], node.outputs, replacement.outputs
        )
        if not weight.uses():
            graph.initializers.pop(weight.name)
        rewritten += 1
        padded += rows % settings.group_size != 0
    if rewritten:
        model.opset_imports.setdefault(MICROSOFT, 1)
    return {
        "quantized_weights": rewritten,
        "ops": {"MatMulNBits": rewritten},
        "padded_layers": padded,
        "float_matmuls": count_ops(graph, "MatMul", "Gemm"),
        "block_size": settings.group_size,
        "symmetric": settings.symmetric,
        "accuracy_level": accuracy_level,
        "quantized_as_written": True,
    }


def _quantized_initializers(graph: Any, weight: Any, settings: Int4Weights) -> list[Any]:
    """The packed weight, scales (and zero points) of one weight, registered as lazy
    initializers under the quantizer's names."""
    import onnx_ir

    rows, cols = (int(size) for size in weight.const_value.shape)
    blocks = -(-rows // settings.group_size)
    shapes = {
        "_Q4": ((cols, blocks, settings.group_size // PACK), onnx_ir.DataType.UINT8),
        "_scales": ((cols, blocks), onnx_ir.DataType.FLOAT),
    }
    if not settings.symmetric:
        shapes["_zero_points"] = ((cols, -(-blocks // PACK)), onnx_ir.DataType.UINT8)
    quantized = _Quantized(weight.const_value, settings.group_size, settings.symmetric)
    values = []
    for part, (suffix, (shape, dtype)) in enumerate(shapes.items()):
        name = weight.name + suffix
        value = onnx_ir.Value(
            name=name,
            shape=onnx_ir.Shape(shape),
            type=onnx_ir.TensorType(dtype),
            const_value=onnx_ir.LazyTensor(
                partial(quantized.part, part, name),
                dtype=dtype,
                shape=onnx_ir.Shape(shape),
                name=name,
            ),
        )
        graph.register_initializer(value)
        values.append(value)
    return values


def _constant_weight(node: Any) -> Any | None:
    """The MatMul's 2-D initializer weight that the quantizer would take, or None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    weight = node.inputs[1]
    if (
        weight is None
        or not weight.is_initializer()
        or weight.const_value is None
        or len(weight.const_value.shape) != 2
    ):
        return None
    return weight


class _Quantized:
    """One weight's packed blocks, scales and zero points: computed by onnxruntime's kernel
    when the saver asks for the first of them, kept until it has taken each."""

    def __init__(self, source: Any, block_size: int, symmetric: bool) -> None:
        self.source = source
        self.block_size = block_size
        self.symmetric = symmetric
        self.parts: dict[int, np.ndarray] = {}

    def part(self, index: int, name: str) -> Any:
        import onnx_ir

        if index not in self.parts:
            packed, scales, zero_points = self._compute()
            self.parts = {0: packed, 1: scales, 2: zero_points}
        return onnx_ir.Tensor(self.parts.pop(index), name=name)

    def _compute(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As MatMulNBitsQuantizer's qbits_block_quant lays the buffers out (QOperator)."""
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits

        weight = np.ascontiguousarray(self.source.numpy(), dtype=np.float32)
        rows, cols = weight.shape
        blocks = -(-rows // self.block_size)
        if blocks * self.block_size != rows:
            weight = np.pad(weight, ((0, blocks * self.block_size - rows), (0, 0)), "constant")
        packed = np.zeros((cols, blocks, self.block_size // PACK), dtype=np.uint8)
        zero_points = np.zeros((cols, -(-blocks // PACK)), dtype=np.uint8)
        scales = np.zeros((cols, blocks), dtype=np.float32)
        quantize_matmul_4bits(
            packed, weight, scales, zero_points, self.block_size, cols, rows, self.symmetric
        )
        return packed, scales, zero_points


__all__ = ["quantize_matmuls_as_written"]
