"""int4 weights (MatMulNBits) quantized while an ONNX model is written.

A component larger than memory (SD 3.5 Large's transformer: 32 GB in fp32) is exported with
its weights read from the checkpoint only as the file is saved (exporters/onnx.py);
onnxruntime's MatMulNBitsQuantizer would load the whole fp32 model. Here its rewrite is made
on the graph instead: each MatMul with a constant 2-D weight becomes the MatMulNBits node the
quantizer makes (same attributes, initializer names and order), and its packed weight, scales
and zero points are lazy tensors computed by onnxruntime's own kernel
(`quantize_matmul_4bits`) when the saver reaches them, one weight at a time. For MatMuls the
file is the one the quantizer writes (tests/quantize/test_onnx_streamed.py checks them byte
for byte). The scheme handler (quantize/onnx.py: int4_weights) uses it on loaded exports too.

Gemm layers (a Linear on a 2-D input: SD3's and Flux's AdaLN modulations, 2.7 B of SD 3.5
Large's 8.1 B parameters) become MatMulNBits with their bias, which the quantizer leaves
float; a Gemm that writes a graph output (a classifier's head) stays float, as int4 schemes
keep the last layer in higher precision.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

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
    gemms = 0
    # A weight used by several layers (tied) is quantized once and shared.
    made: dict[tuple[str, bool], list[Any]] = {}
    for node in list(graph):
        layer = _constant_weight_layer(node, graph)
        if layer is None:
            continue
        weight = layer.weight
        rows, cols = layer.shape
        key = (weight.name, layer.transposed)
        if key not in made:
            made[key] = _quantized_initializers(graph, layer, settings)
        inputs = [node.inputs[0], *made[key]]
        if layer.bias is not None:  # after the optional zero points and g_idx
            inputs += [None] * (5 - len(inputs)) + [layer.bias]
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
        gemms += node.op_type == "Gemm"
    if rewritten:
        model.opset_imports.setdefault(MICROSOFT, 1)
    return {
        "quantized_weights": rewritten,
        "ops": {"MatMulNBits": rewritten},
        "padded_layers": padded,
        "from_gemm": gemms,
        "float_matmuls": count_ops(graph, "MatMul", "Gemm"),
        "block_size": settings.group_size,
        "symmetric": settings.symmetric,
        "accuracy_level": accuracy_level,
        "quantized_as_written": True,
    }


@dataclass(frozen=True)
class _Layer:
    """A layer's constant weight as MatMulNBits takes it: (K, N), from [N, K] if transposed."""

    weight: Any
    transposed: bool
    bias: Any | None

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = (int(size) for size in self.weight.const_value.shape)
        return (cols, rows) if self.transposed else (rows, cols)


def _quantized_initializers(graph: Any, layer: _Layer, settings: Int4Weights) -> list[Any]:
    """The packed weight, scales (and zero points) of one weight, registered as lazy
    initializers under the quantizer's names."""
    import onnx_ir

    rows, cols = layer.shape
    blocks = -(-rows // settings.group_size)
    shapes = {
        "_Q4": ((cols, blocks, settings.group_size // PACK), onnx_ir.DataType.UINT8),
        "_scales": ((cols, blocks), onnx_ir.DataType.FLOAT),
    }
    if not settings.symmetric:
        shapes["_zero_points"] = ((cols, -(-blocks // PACK)), onnx_ir.DataType.UINT8)
    quantized = _Quantized(
        layer.weight.const_value, layer.transposed, settings.group_size, settings.symmetric
    )
    stem = layer.weight.name + ("_T" if layer.transposed else "")
    values = []
    for part, (suffix, (shape, dtype)) in enumerate(shapes.items()):
        name = stem + suffix
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


def _constant_weight_layer(node: Any, graph: Any) -> _Layer | None:
    """The MatMul's or Gemm's weight if it is a constant 2-D initializer, else None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul" and len(node.inputs) == 2:
        weight = node.inputs[1]
        return _Layer(weight, False, None) if _is_constant_matrix(weight) else None
    if node.op_type != "Gemm" or any(output in graph.outputs for output in node.outputs):
        return None
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    plain = (
        attributes.get("transA", 0) == 0
        and attributes.get("alpha", 1.0) == 1.0
        and attributes.get("beta", 1.0) == 1.0
    )
    weight = node.inputs[1]
    if not plain or not _is_constant_matrix(weight):
        return None
    layer = _Layer(weight, bool(attributes.get("transB", 0)), None)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:
        return layer
    # MatMulNBits adds a bias of [N] only (a Gemm's C may broadcast from other shapes).
    shape = bias.shape
    if shape is None or len(shape) != 1 or shape[0] != layer.shape[1]:
        return None
    return replace(layer, bias=bias)


def _is_constant_matrix(weight: Any) -> bool:
    return (
        weight is not None
        and weight.is_initializer()
        and weight.const_value is not None
        and len(weight.const_value.shape) == 2
    )


def count_ops(nodes: Iterable[Any], *ops: str) -> dict[str, int]:
    counts = Counter(node.op_type for node in nodes)
    return {op: counts[op] for op in ops}


class _Quantized:
    """One weight's packed blocks, scales and zero points: computed by onnxruntime's kernel
    when the saver asks for the first of them, kept until it has taken each."""

    def __init__(self, source: Any, transposed: bool, block_size: int, symmetric: bool) -> None:
        self.source = source
        self.transposed = transposed
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

        weight = self.source.numpy()
        weight = np.ascontiguousarray(weight.T if self.transposed else weight, dtype=np.float32)
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


__all__ = ["count_ops", "quantize_matmuls_as_written"]
