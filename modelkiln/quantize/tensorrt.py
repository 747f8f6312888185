"""The tensorrt format's scheme handlers: TensorRT's explicit quantization, written into the
ONNX the engine is built from.

TensorRT quantizes symmetrically only: every zero point is 0, int8 weights span [-127, 127]
and activations [-128, 127]. int8_static runs onnxruntime's calibration as the ONNX scheme does
(modelkiln.quantize.onnx) and writes Q/DQ with those constraints; TensorRT then picks int8
kernels where the graph says so (the INT8 builder flag, modelkiln.tensorrt.recipe).
int4_weights writes blockwise int4 weights as DequantizeLinear -> MatMul, TensorRT's INT4
weight-only form; the activations stay in the compute precision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelkiln.backends import ProfileContext
from modelkiln.errors import ProfileError, QuantizationError
from modelkiln.quantize.handlers import handles
from modelkiln.quantize.onnx import (
    count_ops,
    external_data_path,
    int8_qdq,
    matmul_nbits_quantizer,
    model_bytes,
    onnxruntime_errors,
    save_model,
    scratch_dir,
)
from modelkiln.quantize.schemes import Int4Weights, Int8Static
from modelkiln.tensorrt.onnx_checks import INT4, INT4_BLOCK_SIZES

INT4_OPSET, INT4_IR_VERSION = 21, 10

if TYPE_CHECKING:
    from pathlib import Path

    import onnx

    from modelkiln.quantize import Calibration


def int4_blocks(config: Int4Weights, context: ProfileContext) -> None:
    if config.group_size not in INT4_BLOCK_SIZES:
        raise ProfileError(
            f"{context.origin}: TensorRT's int4 weights take quantization.group_size in "
            f"{', '.join(map(str, INT4_BLOCK_SIZES))}, got {config.group_size}"
        )


@handles(Int8Static, "tensorrt")
def int8_static(entry: Path, settings: Int8Static, calibration: Calibration = ()) -> dict[str, Any]:
    """int8 weights and activations as Q/DQ around the MatMul, Gemm and Conv layers, with
    activation ranges calibrated on the feeds; symmetric whatever quantization.symmetric says."""
    return int8_qdq(
        entry,
        settings,
        calibration,
        activations="int8",
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            # A quantized bias is an int32 DequantizeLinear, which TensorRT does not take;
            # it fuses the float bias into the int8 kernel itself.
            "QuantizeBias": False,
        },
        symmetric=True,  # TensorRT's only form
        alternative="scheme 'int4-weights' (no calibration)",
    )


@handles(Int4Weights, "tensorrt", check=int4_blocks)
def int4_weights(
    entry: Path, settings: Int4Weights, calibration: Calibration = ()
) -> dict[str, Any]:
    """Blockwise symmetric int4 weights (blocks along the input channels) of every MatMul with
    a constant 2-D weight whose input channels the block size divides; the rest stay float."""
    import onnx
    from onnxruntime.quantization import QuantFormat

    block = settings.group_size
    if block not in INT4_BLOCK_SIZES:
        raise QuantizationError(
            f"quantization.group_size {block} is not one of TensorRT's int4 block sizes: use "
            f"{' or '.join(map(str, INT4_BLOCK_SIZES))}"
        )
    MatMulNBitsQuantizer = matmul_nbits_quantizer()
    data = external_data_path(entry)
    before = model_bytes(entry, data)
    model = onnx.load(str(entry))
    _int4_opset(model)
    # A partial last block is valid ONNX, but not a TensorRT int4 block: keep those float.
    partial = _partial_block_matmuls(model.graph, block)
    with scratch_dir(entry) as scratch, onnxruntime_errors("int4-weights"):
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=block,
            is_symmetric=True,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=("MatMul",),
            nodes_to_exclude=partial,
        )
        quantizer.process()
        model = quantizer.model.model
        save_model(model, entry, scratch)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    quantized = [
        node
        for node in model.graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in initializers
        and initializers[node.input[0]].data_type == INT4
    ]
    return {
        "quantized_weights": len(quantized),
        "ops": {"DequantizeLinear": len(quantized)},
        "weights": "int4",
        "block_size": block,
        "symmetric": True,
        "float_layers": {
            "partial_blocks": len(partial),  # input channels not a multiple of the block
            **count_ops(model.graph.node, "Gemm", "Conv"),
        },
        "bytes_before": before,
        "bytes_after": model_bytes(entry, data),
    }


def _int4_opset(model: onnx.ModelProto) -> None:
    """int4 tensors and blocked DequantizeLinear need opset 21 and IR version 10. The quantizer
    raises the opset itself, with a warning on the root logger; raised here, it has no cause
    to. No op of our exports changed meaning between opsets 18 and 21 (GroupNormalization did,
    but the exporter writes InstanceNormalization)."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < INT4_OPSET:
            opset.version = INT4_OPSET
    model.ir_version = max(model.ir_version, INT4_IR_VERSION)


def _partial_block_matmuls(graph: onnx.GraphProto, block: int) -> list[str]:
    """Names of the MatMuls with a constant weight of input channels (rows) the block does not
    divide. Unnamed nodes get a name here: the quantizer excludes nodes by name."""
    weights = {tensor.name: tensor for tensor in graph.initializer}
    names = []
    for index, node in enumerate(graph.node):
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) < 2 or weight.dims[-2] % block == 0:
            continue
        if not node.name:
            node.name = f"MatMul_{index}"
        names.append(node.name)
    return names
