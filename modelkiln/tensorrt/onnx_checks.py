"""What TensorRT's ONNX parser needs of the ONNX it builds from, checked before a build.

Our dynamo exports need no rewriting for TensorRT 10: every op they contain (LayerNormalization,
the InstanceNormalization of GroupNorm, Erf, IsNaN/Where, Resize 'nearest', ArgMax, GatherND,
...) is in onnx-tensorrt's support matrix, and int64 inputs such as CLIP's input_ids are
native since TensorRT 10. What can still break a build is what other tools write into the
graph: onnxruntime's com.microsoft ops, its integer-kernel ops, quantization with zero points
(TensorRT quantizes symmetrically only) or int32 biases, 4-bit blocks TensorRT has no kernel
for. This module finds those and names them, instead of a parser error deep in a build on
a GPU machine.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import ExportError

if TYPE_CHECKING:
    import onnx

STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
# Standard ops onnx-tensorrt does not import (docs/operators.md of TensorRT 10.15), among
# those an exporter or an onnxruntime quantizer can write.
UNSUPPORTED_OPS = frozenset(
    {
        "AffineGrid",
        "Bernoulli",
        "BitShift",
        "BitwiseAnd",
        "BitwiseNot",
        "BitwiseOr",
        "BitwiseXor",
        "CenterCropPad",
        "Col2Im",
        "Compress",
        "ConcatFromSequence",
        "ConvInteger",
        "DFT",
        "Det",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "MaxRoiPool",
        "MaxUnpool",
        "Multinomial",
        "NegativeLogLikelihoodLoss",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
        "QLinearConv",
        "QLinearMatMul",
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceLength",
        "SequenceMap",
        "SoftmaxCrossEntropyLoss",
        "SplitToSequence",
        "TfIdfVectorizer",
        "Unique",
    }
)
# onnx.TensorProto types DequantizeLinear may take in TensorRT: INT8, INT4, FLOAT8E4M3FN,
# FLOAT4E2M1 (not onnxruntime's INT32 quantized biases, nor unsigned types).
DEQUANTIZABLE = {3: "int8", 22: "int4", 17: "fp8", 23: "fp4"}
INT4 = 22
# TensorRT's INT4 weight-only blocks (the 'Quantization Schemes' page of its developer guide).
INT4_BLOCK_SIZES = (64, 128)
INT64 = 7


def check_onnx(path: Path) -> dict[str, Any]:
    """Raise ExportError naming everything TensorRT cannot build from `path`; otherwise return
    what the build will meet (ops, int64 inputs, Q/DQ nodes), for the log and the tests."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    ops = Counter((node.domain, node.op_type) for node in graph.node)
    problems = []
    foreign = sorted(f"{d}.{op}" for d, op in ops if d not in STANDARD_DOMAINS)
    if foreign:
        problems.append(
            f"ops outside the ONNX standard ({', '.join(foreign)}; onnxruntime's own, "
            "TensorRT does not know them)"
        )
    unsupported = sorted(op for d, op in ops if d in STANDARD_DOMAINS and op in UNSUPPORTED_OPS)
    if unsupported:
        problems.append(f"ops TensorRT does not import ({', '.join(unsupported)})")
    for node in graph.node:
        problems += _node_problems(node, initializers, path.parent)
    if problems:
        raise ExportError(f"{path} has what TensorRT cannot build: {'; '.join(problems)}")
    counts = Counter(op for _, op in ops.elements())
    opsets = [o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS]
    return {
        "opset": max(opsets, default=0),
        "nodes": len(graph.node),
        "int64_inputs": [
            value.name for value in graph.input if value.type.tensor_type.elem_type == INT64
        ],
        "ops": {op: counts[op] for op in ("QuantizeLinear", "DequantizeLinear")},
    }


def _node_problems(
    node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], base: Path
) -> list[str]:
    label = f"{node.op_type} '{node.name or node.output[0]}'"
    problems = []
    if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
        zero_point = initializers.get(node.input[2])
        if zero_point is not None and _any_nonzero(zero_point, base):
            problems.append(f"{label} has a non-zero zero point (TensorRT quantizes symmetrically)")
    if node.op_type == "DequantizeLinear":
        weight = initializers.get(node.input[0])
        if weight is not None and weight.data_type not in DEQUANTIZABLE:
            type_name = _type_name(weight.data_type)
            problems.append(f"{label} dequantizes {type_name} (TensorRT takes int8/int4/fp8/fp4)")
        block = _attribute(node, "block_size")
        if weight is not None and weight.data_type == INT4 and block not in INT4_BLOCK_SIZES:
            problems.append(
                f"{label} has int4 blocks of {block} (TensorRT's: "
                f"{', '.join(map(str, INT4_BLOCK_SIZES))})"
            )
    if node.op_type == "Resize" and _attribute(node, "antialias"):
        problems.append(f"{label} antialiases (TensorRT's Resize does not)")
    return problems


def _any_nonzero(tensor: onnx.TensorProto, base: Path) -> bool:
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(tensor):  # a per-channel zero point of many channels
        load_external_data_for_tensor(tensor, str(base))
    return bool(numpy_helper.to_array(tensor).any())


def _attribute(node: onnx.NodeProto, name: str) -> int | None:
    return next((int(a.i) for a in node.attribute if a.name == name), None)


def _type_name(data_type: int) -> str:
    import onnx

    return str(onnx.TensorProto.DataType.Name(data_type)).lower()
