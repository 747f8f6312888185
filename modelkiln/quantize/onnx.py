"""The onnx format's scheme handlers (onnxruntime.quantization), and the fp16 conversion of
exported models.

Every function rewrites `model.onnx` in place, in the export's layout (one `<stem>.onnx_data`
beside it when the export had one), and returns the manifest's record of what it did.
Choices below were measured with onnxruntime 1.32 on an AVX-512 VNNI / AMX Xeon, on the tiny
test ViT (tests/quantize/test_onnx_schemes.py), a ViT-S/16 and single MatMul layers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.backends import ProfileContext
from modelkiln.errors import (
    ExportError,
    ProfileError,
    QuantizationError,
    UnsupportedError,
    first_line,
)
from modelkiln.quantize import check_calibration
from modelkiln.quantize.handlers import handles
from modelkiln.quantize.onnx_calibration import (
    STATIC_OPS,
    calibrate,
    calibration_method,
    graph_inputs,
)
from modelkiln.quantize.onnx_streamed import count_ops, quantize_matmuls_as_written
from modelkiln.quantize.schemes import (
    Int4Weights,
    Int8Dynamic,
    Int8Static,
    NF4Weights,
    SchemeConfig,
)

if TYPE_CHECKING:
    import onnx
    import onnx_ir

    from modelkiln.quantize import Calibration

INTEGER_TYPES = {2, 3}  # onnx.TensorProto.UINT8, INT8
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16
# MLAS's block-wise 4-bit quantizers (MatMulNBits and MatMulBnb4) take only these; any other
# fails deep in C++ with an assertion message.
BLOCK_SIZES = (16, 32, 64, 128, 256)
# MatMulNBits accuracy_level 4: activations quantized to int8 at run time and int8 dot
# products (VNNI/AMX). On one 4096x4096 layer at batch 1 it ran 1.7-1.9x faster than level 0
# (fp32 compute) with the same SQNR; at 256 rows x 1024 it was 1.3x faster with group 128,
# 15% slower with group 32.
ACCURACY_LEVEL = 4
# Below this much free space where the quantizers write, their errors name the disk too.
LOW_DISK_BYTES = 1_000_000_000

logger = logging.getLogger(__name__)


def from_fp32(config: SchemeConfig, context: ProfileContext) -> None:
    """onnxruntime's quantizers read fp32 graphs: the export they rewrite keeps fp32 weights."""
    weights = context.profile.precision.weights
    if weights != "fp32":
        raise UnsupportedError(
            f"{context.origin}: onnx quantization schemes start from fp32 weights, not "
            f"{weights}; set precision.weights = 'fp32' with scheme {config.name}"
        )


def four_bit_blocks(config: Int4Weights | NF4Weights, context: ProfileContext) -> None:
    """MLAS's block-wise 4-bit kernels take a few block sizes only."""
    from_fp32(config, context)
    if config.group_size not in BLOCK_SIZES:
        raise ProfileError(
            f"{context.origin}: onnxruntime's 4-bit kernels take quantization.group_size in "
            f"{', '.join(map(str, BLOCK_SIZES))}, got {config.group_size}"
        )


def _attention_with_bias(entry: Path) -> list[str]:
    """Fused Attentions whose attention_bias masks something (CLIP's causal mask): QAttention
    has no such input and onnxruntime's quantizer drops it (a CLIP text encoder's cosine fell
    to 0), so they stay fp32. ViT's bias, the exporter's all-zero mask, may go."""
    import onnx

    graph = onnx.load(str(entry), load_external_data=False).graph
    producers = {output: node for node in graph.node for output in node.output}
    constants = {init.name: init for init in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "Attention"
        and len(node.input) > 5
        and node.input[5]
        and not _is_zero_bias(node.input[5], producers, constants, entry.parent)
    ]


def _is_zero_bias(
    name: str, producers: dict[str, Any], constants: dict[str, Any], folder: Path
) -> bool:
    """Where(all-true mask, 0, -inf), the mask expanded from a constant: what torch's SDPA
    export makes of "no mask". Anything else may mask (conservatively: it does)."""
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    def constant(value: str) -> Any:
        if value in constants:
            tensor = constants[value]
            if uses_external_data(tensor):  # read this one tensor, not the model's weights
                load_external_data_for_tensor(tensor, str(folder))
            return numpy_helper.to_array(tensor)
        node = producers.get(value)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    where = producers.get(name)
    if where is None or where.op_type != "Where":
        return False
    condition = where.input[0]
    while (node := producers.get(condition)) is not None and node.op_type == "Expand":
        condition = node.input[0]
    mask, kept = constant(condition), constant(where.input[1])
    return mask is not None and kept is not None and bool(mask.all()) and not kept.any()


@handles(Int8Dynamic, "onnx", check=from_fp32)
def int8_dynamic(
    entry: Path, settings: Int8Dynamic, calibration: Calibration = ()
) -> dict[str, Any]:
    """int8 weights, activations quantized at run time (MatMulInteger / DynamicQuantizeLinear)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    data = external_data_path(entry)
    before = model_bytes(entry, data)
    with scratch_dir(entry) as scratch, onnxruntime_errors("int8-dynamic"):
        output = scratch / entry.name
        quantize_dynamic(
            entry,
            output,
            weight_type=QuantType.QInt8,
            per_channel=settings.per_channel,
            use_external_data_format=data.is_file(),
            nodes_to_exclude=_attention_with_bias(entry),
        )
        model = onnx.load(str(output))
        save_model(model, entry, scratch)
    ops = Counter(node.op_type for node in model.graph.node)
    return {
        "quantized_weights": integer_weights(model),
        "ops": {
            op: ops[op]
            for op in ("MatMulInteger", "ConvInteger", "QAttention", "DynamicQuantizeLinear")
        },
        "per_channel": settings.per_channel,
        "bytes_before": before,
        "bytes_after": model_bytes(entry, data),
    }


@handles(Int8Static, "onnx", check=from_fp32)
def int8_static(entry: Path, settings: Int8Static, calibration: Calibration = ()) -> dict[str, Any]:
    """int8 weights and activations in QDQ form, activation ranges from the calibration feeds;
    onnxruntime fuses each DequantizeLinear -> op -> QuantizeLinear into an integer kernel."""
    return int8_qdq(
        entry,
        settings,
        calibration,
        # u8 activations x s8 weights is MLAS's native VNNI/AMX product (vpdpbusd takes
        # u8 x s8): s8 activations ran the ViT-S 25% slower here.
        activations="uint8",
        # Weights stay symmetric (ORT's default, zero point 0 as the kernels prefer); the
        # setting picks symmetric or asymmetric activations, like openvino's presets.
        # A MatMul's float output is what its consumers read (attention, Add, LayerNorm):
        # quantizing it too made each MatMul a QLinearMatMul plus a DequantizeLinear pass;
        # without, ONNX Runtime runs it as MatMulIntegerToFloat (its output dequantized in
        # the kernel), as its dynamic quantization does.
        extra_options={
            "ActivationSymmetric": settings.symmetric,
            "OpTypesToExcludeOutputQuantization": list(STATIC_OPS),
        },
        symmetric=settings.symmetric,
        alternative="scheme 'int8-dynamic' (no calibration)",
    )


def int8_qdq(
    entry: Path,
    settings: Int8Static,
    calibration: Calibration,
    *,
    activations: str,
    extra_options: dict[str, Any],
    symmetric: bool,
    alternative: str,
) -> dict[str, Any]:
    """QDQ int8 of the MatMul/Gemm/Conv layers with s8 weights and `activations` ("uint8" or
    "int8") calibrated on the feeds; the int8-static of ONNX Runtime and of TensorRT, which
    differ in activation type and onnxruntime's `extra_options`."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(entry), load_external_data=False).graph
    check_calibration(calibration, graph_inputs(graph), "int8-static", alternative)
    data = external_data_path(entry)
    before = model_bytes(entry, data)
    method, options = calibration_method(settings)
    with scratch_dir(entry) as scratch, onnxruntime_errors("int8-static"):
        # Ranges first, with the calibrator and its settings, then quantize_static reads them
        # back through its calibration cache (a TensorsData file) instead of calibrating.
        ranges = scratch / "ranges.json"
        calibrate(entry, calibration, method, options, scratch, ranges)
        output = scratch / entry.name
        quantize_static(
            entry,
            output,
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(STATIC_OPS),
            per_channel=settings.per_channel,
            # VNNI does not saturate, and TensorRT takes full-range int8: no reduce_range
            # (7-bit weights).
            reduce_range=False,
            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=activation_matmuls(graph),
            use_external_data_format=data.is_file(),
            calibrate_method=method,
            extra_options=extra_options,
            calibration_cache_path=ranges,
        )
        model = onnx.load(str(output))
        save_model(model, entry, scratch)
    return {
        "quantized_weights": integer_weights(model),
        "ops": count_ops(model.graph.node, "QuantizeLinear", "DequantizeLinear"),
        "activations": activations,
        "weights": "int8",
        "per_channel": settings.per_channel,
        "symmetric": symmetric,
        "method": settings.method,
        "calibrator": options,  # its settings beyond the method; {} for minmax
        "calibration_batches": len(calibration),
        "bytes_before": before,
        "bytes_after": model_bytes(entry, data),
    }


def activation_matmuls(graph: onnx.GraphProto) -> list[str]:
    """The attention's activation x activation MatMuls, which int8-static leaves float: they
    have no weight to shrink, and in float they kept 0.1-0.6 dB more SQNR at the same speed.
    ORT's MatMulConstBOnly would say this, but its QDQ quantizer ignores that option (only
    QOperator and dynamic read it)."""
    initializers = {tensor.name for tensor in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and node.name and node.input[1] not in initializers
    ]


@handles(Int4Weights, "onnx", check=four_bit_blocks)
def int4_weights(
    entry: Path, settings: Int4Weights, calibration: Calibration = ()
) -> dict[str, Any]:
    """Block-wise int4 weights of every MatMul and Gemm with a constant 2-D weight
    (MatMulNBits), as onnxruntime's MatMulNBitsQuantizer makes them (quantize/onnx_streamed.py,
    one weight in memory at a time); activations stay float. Conv layers, activation x
    activation MatMuls and a Gemm writing a graph output (a classifier's head) stay float."""
    import onnx_ir

    _check_block_size(settings.group_size, "MatMulNBits")
    data = external_data_path(entry)
    before = model_bytes(entry, data)
    with scratch_dir(entry) as scratch, onnxruntime_errors("int4-weights"):
        model = onnx_ir.load(entry)
        record = quantize_matmuls_as_written(model, settings, ACCURACY_LEVEL)
        save_model(model, entry, scratch)
    # ORT's kernel zero-pads the input channels of a layer up to a whole number of groups
    # (it neither skips the layer nor fails): "padded_layers" counts them.
    return {**record, "bytes_before": before, "bytes_after": model_bytes(entry, data)}


@handles(NF4Weights, "onnx", check=four_bit_blocks)
def nf4_weights(entry: Path, settings: NF4Weights, calibration: Calibration = ()) -> dict[str, Any]:
    """NF4 (4-bit NormalFloat, absmax per block) weights of every MatMul with a constant 2-D
    weight (MatMulBnb4). ORT's CPU kernel runs it with outputs as close as int4's, but
    dequantizes the whole weight on every call: 4x slower than fp32 at batch 1 on a 4096x4096
    layer. It saves memory; int4-weights (MatMulNBits) is the fast 4-bit CPU scheme."""
    import onnx
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    _check_block_size(settings.group_size, "MatMulBnb4")
    data = external_data_path(entry)
    before = model_bytes(entry, data)
    with scratch_dir(entry) as scratch, onnxruntime_errors("nf4-weights"):
        quantizer = MatMulBnb4Quantizer(
            onnx.load(str(entry)), MatMulBnb4Quantizer.NF4, settings.group_size
        )
        quantizer.process()
        model = quantizer.model.model
        save_model(model, entry, scratch)
    quantized = count_ops(model.graph.node, "MatMulBnb4")["MatMulBnb4"]
    return {
        "quantized_weights": quantized,
        "ops": {"MatMulBnb4": quantized},
        "float_matmuls": count_ops(model.graph.node, "MatMul", "Gemm"),
        "quant_type": "nf4",
        "block_size": settings.group_size,
        "bytes_before": before,
        "bytes_after": model_bytes(entry, data),
    }


# Ops the fp16 conversion leaves in fp32 beyond the converter's own list (to_fp16).
FP32_ONLY_OPS = ("ScatterElements",)


def to_fp16(entry: Path) -> dict[str, Any]:
    """fp16 weights and compute, fp32 graph inputs and outputs (Casts at the edges).

    ORT's CPU provider inserts Casts around the ops it has no fp16 kernel for (113 Casts in
    a ViT-S) and runs those in fp32, so the result runs everywhere; on CPU it mostly halves
    the file, GPUs get the fp16 compute. Blocked beyond the converter's defaults:
    ScatterElements, whose fp16 kernel exists but refuses a reduction at run time (token
    merging's summed tokens), and whose sums want fp32 anyway.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    data = external_data_path(entry)
    before = model_bytes(entry, data)
    with scratch_dir(entry) as scratch:
        try:
            # A path, not a ModelProto: the converter then infers shapes with
            # infer_shapes_path, which works past protobuf's 2 GB limit.
            model = convert_float_to_float16(
                str(entry),
                keep_io_types=True,
                op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_ONLY_OPS],
            )
        except Exception as error:  # the converter raises many unrelated types
            raise ExportError(f"fp16 conversion failed: {first_line(error)}") from error
        save_model(model, entry, scratch)
    return {
        "converted_initializers": sum(1 for t in model.graph.initializer if t.data_type == FLOAT16),
        "float32_initializers": sum(1 for t in model.graph.initializer if t.data_type == FLOAT),
        "keep_io_types": True,
        "bytes_before": before,
        "bytes_after": model_bytes(entry, data),
    }


def external_data_path(entry: Path) -> Path:
    return entry.with_name(f"{entry.stem}.onnx_data")


def model_bytes(entry: Path, data: Path) -> int:
    return entry.stat().st_size + (data.stat().st_size if data.is_file() else 0)


@contextlib.contextmanager
def scratch_dir(entry: Path) -> Iterator[Path]:
    """A temporary folder beside the model, made onnxruntime's temp folder too: calibration
    writes an augmented copy of the whole model there, too big for a small /tmp. The switch
    is process-wide while it lasts."""
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=".quantize-") as folder:
        previous = tempfile.tempdir
        tempfile.tempdir = folder
        try:
            yield Path(folder)
        finally:
            tempfile.tempdir = previous


def save_model(model: onnx.ModelProto | onnx_ir.Model, entry: Path, scratch: Path) -> None:
    """Write `model` (a ModelProto, or an onnx_ir.Model whose lazy tensors are computed as they
    are written) over `entry` in the export's layout: all weights in one `<stem>.onnx_data`
    beside it when the export had one, else inline. Staged in `scratch` first, so a failed
    save leaves the original files."""
    import onnx
    import onnx_ir

    data = external_data_path(entry)
    staged = scratch / "staged" / entry.name
    staged.parent.mkdir()
    if isinstance(model, onnx_ir.Model):
        onnx_ir.save(model, staged, external_data=data.name if data.is_file() else None)
    else:
        onnx.save_model(
            model,
            str(staged),
            save_as_external_data=data.is_file(),
            all_tensors_to_one_file=True,
            location=data.name,
        )
    staged_data = staged.with_name(data.name)
    if staged_data.is_file():
        staged_data.replace(data)
    else:
        data.unlink(missing_ok=True)
    staged.replace(entry)


def matmul_nbits_quantizer() -> Any:
    """onnxruntime's MatMulNBitsQuantizer, imported without its side effect: the module calls
    logging.basicConfig(level=INFO) on import, which would configure the caller's root logger
    (and print every node it skips). The root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    return MatMulNBitsQuantizer


@contextlib.contextmanager
def onnxruntime_errors(scheme: str) -> Iterator[None]:
    """Around onnxruntime's quantizers: what they print (the entropy and percentile
    calibrators report progress on stdout) and their root-logger hints go to our debug log,
    and the many unrelated exception types they raise become one QuantizationError."""
    printed = io.StringIO()
    root = logging.getLogger()
    hint = _PreprocessHint()
    root.addFilter(hint)
    try:
        with contextlib.redirect_stdout(printed):
            yield
    except QuantizationError:
        raise
    except Exception as error:
        raise QuantizationError(
            f"onnxruntime {scheme} quantization failed: {first_line(error)}{_low_disk_hint()}"
        ) from error
    finally:
        root.removeFilter(hint)
        if printed.getvalue():
            logger.debug("onnxruntime %s output:\n%s", scheme, printed.getvalue())


def _low_disk_hint() -> str:
    """onnxruntime's quantizers write copies of the model to their temporary folder (ours,
    beside the model); on a full disk a truncated copy fails as something unrelated, e.g.
    protobuf's "Wire format was corrupt"."""
    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if free >= LOW_DISK_BYTES:
        return ""
    return (
        f" (only {free / 1e6:.0f} MB free in {folder}: the quantizer's copies of the model "
        "may have been cut short; free disk space and build again)"
    )


class _PreprocessHint(logging.Filter):
    """quantize_static and quantize_dynamic log "please consider pre-processing" on the root
    logger, which reaches the terminal through logging's last-resort handler. We skip
    quant_pre_process on purpose: it (symbolic shapes + ORT's basic optimizations) changed no
    number on our exports, whose shapes the exporter already inferred, and it costs another
    copy of the model."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "pre-process" not in record.getMessage():
            return True
        logger.debug("onnxruntime: %s", record.getMessage())
        return False


def _check_block_size(group_size: int, op: str) -> None:
    if group_size not in BLOCK_SIZES:
        raise QuantizationError(
            f"quantization.group_size {group_size} is not supported by onnxruntime's {op}: "
            f"use one of {', '.join(map(str, BLOCK_SIZES))}"
        )


def integer_weights(model: onnx.ModelProto) -> int:
    """int8/uint8 initializers of rank >= 2: the quantized weights (not scales, zero points)."""
    return sum(
        1 for t in model.graph.initializer if t.data_type in INTEGER_TYPES and len(t.dims) >= 2
    )
