"""The openvino format's scheme handlers, with nncf: weight compression (int8, int4, nf4;
activations stay floating point), full int8 (weights and activations, calibrated) and the
hybrid int8 that optimum-intel uses for Stable Diffusion UNets."""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import QuantizationError, first_line
from modelkiln.quantize import check_calibration
from modelkiln.quantize.handlers import handles
from modelkiln.quantize.schemes import Int4Weights, Int8Hybrid, Int8Static, Int8Weights, NF4Weights

if TYPE_CHECKING:
    from modelkiln.quantize import Calibration

WeightScheme = Int8Weights | Int4Weights | NF4Weights

logger = logging.getLogger(__name__)
LOW_PRECISION = {"i8", "u8", "i4", "u4", "nf4"}
# What nncf.quantize leaves in the IR where activations are quantized (FakeConvert: fp8).
QUANTIZER_OPS = ("FakeQuantize", "FakeConvert")


def nncf_mode(settings: WeightScheme | Int8Hybrid) -> str:
    """nncf's CompressWeightsMode name of a scheme's weights."""
    if isinstance(settings, NF4Weights):
        return "NF4"
    bits = "INT4" if isinstance(settings, Int4Weights) else "INT8"
    return f"{bits}_{'SYM' if settings.symmetric else 'ASYM'}"


@handles(Int8Weights, "openvino")
@handles(Int4Weights, "openvino")
@handles(NF4Weights, "openvino")
def compress_weights(
    entry: Path, settings: WeightScheme, calibration: Calibration = ()
) -> dict[str, Any]:
    """nncf.compress_weights on the IR; int4/nf4 use settings.group_size and ratio (the rest
    of the layers, and embeddings and the last layer, stay int8 as nncf decides)."""
    import openvino as ov

    before_bytes = _size(entry)
    model = ov.Core().read_model(entry)
    before = low_precision_constants(model)
    compressed, options = compress_model(model, settings)
    after = low_precision_constants(compressed)
    staged = _stage(compressed, entry)
    del model, compressed
    _swap(staged, entry)
    return {
        "quantized_weights": sum(after.values()) - sum(before.values()),
        "nncf_mode": nncf_mode(settings).lower(),
        "weight_types": dict(after),
        **options,
        "bytes_before": before_bytes,
        "bytes_after": _size(entry),
    }


def compress_model(
    model: Any, settings: WeightScheme, *, all_layers: bool | None = None
) -> tuple[Any, dict[str, Any]]:
    """nncf.compress_weights on an in-memory IR: the compressed model, and the nncf options
    the manifest records. `all_layers`: int4 for the last MatMul and embeddings too (nncf's
    default keeps them int8), for a block cut from the middle of a model."""
    import nncf

    mode = nncf_mode(settings)
    options: dict[str, Any] = {}
    if isinstance(settings, Int4Weights | NF4Weights):
        options = {"group_size": settings.group_size, "ratio": settings.ratio}
    try:
        with _quiet_nncf():
            compressed = nncf.compress_weights(
                model,
                mode=getattr(nncf.CompressWeightsMode, mode),
                **options,
                **({"all_layers": all_layers} if all_layers is not None and options else {}),
            )
    except Exception as error:  # nncf raises many unrelated types
        hint = ""
        if "group size" in str(error):
            hint = (
                f"; quantization.group_size = {options['group_size']} must divide the input "
                "channels of every layer: pick a divisor of the model's hidden size (64, 32, ...)"
            )
        raise QuantizationError(
            f"nncf {mode.lower()} weight compression failed: {first_line(error)}{hint}"
        ) from error
    return compressed, options


@handles(Int8Static, "openvino")
def int8_static(entry: Path, settings: Int8Static, calibration: Calibration = ()) -> dict[str, Any]:
    """nncf.quantize: int8 weights and int8 activations (FakeQuantize before each quantized
    op, ranges from the calibration feeds). The IR stores the weights as int8 constants."""
    import nncf
    import openvino as ov

    before_bytes = _size(entry)
    model = ov.Core().read_model(entry)
    dataset = _dataset(model, calibration, settings.name)
    before = low_precision_constants(model)
    try:
        with _quiet_nncf():
            quantized = nncf.quantize(
                model, dataset, subset_size=len(calibration), **_quantize_options(settings)
            )
    except Exception as error:  # nncf raises many unrelated types
        raise QuantizationError(f"nncf int8 quantization failed: {first_line(error)}") from error
    record, staged = _describe(quantized, entry, before, settings, len(calibration))
    del model, quantized
    _swap(staged, entry)
    return {**record, "bytes_before": before_bytes, "bytes_after": _size(entry)}


@handles(Int8Hybrid, "openvino")
def int8_hybrid(entry: Path, settings: Int8Hybrid, calibration: Calibration = ()) -> dict[str, Any]:
    """optimum-intel's hybrid mode for diffusion UNets: the weights of MatMuls and embeddings
    compressed to int8 (their activations stay floating point), then every other op,
    convolutions included, quantized in full (int8 weights and activations) by nncf.quantize.
    With `matmul_weights = "float"` the MatMuls and embeddings are left as they are."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    before_bytes = _size(entry)
    model = ov.Core().read_model(entry)
    dataset = _dataset(model, calibration, settings.name)
    before = low_precision_constants(model)
    weighted = _ops_with_weights(model)
    mode = nncf_mode(settings)
    # Convolutions keep float weights here so that nncf.quantize quantizes them in full.
    convolutions = any(op.get_type_name() == "Convolution" for op in model.get_ops())
    try:
        with _quiet_nncf():
            compressed = (
                nncf.compress_weights(
                    model,
                    mode=getattr(nncf.CompressWeightsMode, mode),
                    ignored_scope=nncf.IgnoredScope(types=["Convolution"])
                    if convolutions
                    else None,
                )
                if settings.matmul_weights == "int8"
                else model
            )
            quantized = nncf.quantize(
                compressed,
                dataset,
                subset_size=len(calibration),
                ignored_scope=nncf.IgnoredScope(names=weighted),
                # Smoothing would rescale the MatMul weights that are already int8.
                advanced_parameters=AdvancedQuantizationParameters(
                    smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)
                ),
                **_quantize_options(settings),
            )
    except Exception as error:  # nncf raises many unrelated types
        raise QuantizationError(
            f"nncf int8 hybrid quantization failed: {first_line(error)}"
        ) from error
    record, staged = _describe(quantized, entry, before, settings, len(calibration))
    del model, compressed, quantized
    _swap(staged, entry)
    return {
        **record,
        "nncf_mode": mode.lower(),
        "matmul_weights": settings.matmul_weights,
        # MatMuls and embeddings: int8 weights on float activations, or float altogether.
        "weight_only_ops": len(weighted) if settings.matmul_weights == "int8" else 0,
        "float_ops": 0 if settings.matmul_weights == "int8" else len(weighted),
        "bytes_before": before_bytes,
        "bytes_after": _size(entry),
    }


def _quantize_options(settings: Int8Static | Int8Hybrid) -> dict[str, Any]:
    import nncf

    transformer = settings.model_type == "transformer"
    return {
        "model_type": nncf.ModelType.TRANSFORMER if transformer else None,
        # performance: symmetric weights and activations; mixed: asymmetric activations.
        "preset": nncf.QuantizationPreset.PERFORMANCE
        if settings.symmetric
        else nncf.QuantizationPreset.MIXED,
    }


def _describe(
    quantized: Any,
    entry: Path,
    before: Counter[str],
    settings: Int8Static | Int8Hybrid,
    batches: int,
) -> tuple[dict[str, Any], Path]:
    """The manifest's record of a quantized model, and the model staged beside `entry`."""
    after = low_precision_constants(quantized)
    ops = Counter(op.get_type_name() for op in quantized.get_ops())
    record = {
        "quantized_weights": sum(after.values()) - sum(before.values()),
        "weight_types": dict(after),
        "ops": {name: ops[name] for name in QUANTIZER_OPS if ops[name]},
        "preset": "performance" if settings.symmetric else "mixed",
        "model_type": settings.model_type,
        "calibration_batches": batches,
    }
    return record, _stage(quantized, entry)


def _dataset(model: Any, calibration: Calibration, scheme: str) -> Any:
    """nncf.Dataset of the feeds, checked against the IR's inputs first: nncf would fail
    later, mid-statistics, with OpenVINO's shape error and no word about calibration."""
    import nncf

    inputs = {
        port.get_any_name(): (
            [d.get_length() if d.is_static else None for d in port.get_partial_shape()],
            str(port.get_partial_shape()),
        )
        for port in model.inputs
    }
    check_calibration(calibration, inputs, scheme, "a weight-only scheme (int8-weights)")
    return nncf.Dataset(list(calibration))


def _ops_with_weights(model: Any) -> list[str]:
    """Names of the MatMuls with a constant operand and of the embedding Gathers (constant
    float table): the ops whose weights the hybrid mode compresses and leaves out of
    activation quantization, as optimum-intel's _collect_ops_with_weights does."""
    names = []
    for op in model.get_ops():
        kind = op.get_type_name()
        matmul = kind == "MatMul" and (_constant_operand(op, 0) or _constant_operand(op, 1))
        embedding = (
            kind == "Gather"
            and op.input_value(0).get_element_type().is_real()
            and _constant_operand(op, 0)
        )
        if matmul or embedding:
            names.append(op.get_friendly_name())
    return names


def _constant_operand(op: Any, port: int) -> bool:
    """Whether input `port` is a Constant, possibly behind Convert / Reshape / FakeQuantize
    (an fp16 IR decompresses its weights with a Convert)."""
    node = op.input_value(port).get_node()
    while node.get_type_name() in ("Convert", "Reshape", "FakeQuantize"):
        node = node.input_value(0).get_node()
    return bool(node.get_type_name() == "Constant")


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """nncf logs bit-width tables and prints rich progress bars; the library never prints, so
    both go to our debug log."""
    captured = io.StringIO()
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(max(level, logging.WARNING))
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        nncf_logger.setLevel(level)
        logger.debug("nncf output:\n%s", captured.getvalue())


def _stage(model: Any, entry: Path) -> Path:
    """Save beside `entry`: the original .bin is memory-mapped by the model we read, so it is
    replaced only once that model is released (_swap)."""
    import openvino as ov

    staged = entry.with_name(f"{entry.stem}.quantized.xml")
    ov.save_model(model, str(staged), compress_to_fp16=False)
    return staged


def _swap(staged: Path, entry: Path) -> None:
    staged.replace(entry)
    staged.with_suffix(".bin").replace(entry.with_suffix(".bin"))


def _size(entry: Path) -> int:
    return entry.stat().st_size + entry.with_suffix(".bin").stat().st_size


def low_precision_constants(model: Any) -> Counter[str]:
    """Weight constants stored in an integer or 4-bit type, by type. Zero points share the
    type and can have the shape of a 1x1 convolution's weights: told apart by where they go
    (the subtrahend of the decompression's Subtract), not by shape."""
    types: Counter[str] = Counter()
    for op in model.get_ops():
        if op.get_type_name() != "Constant" or len(op.get_output_shape(0)) < 2:
            continue
        name = op.get_element_type().get_type_name()
        if name in LOW_PRECISION and not _is_zero_point(op):
            types[name] += 1
    return types


def _is_zero_point(constant: Any) -> bool:
    pending = list(constant.output(0).get_target_inputs())
    while pending:
        target = pending.pop()
        node = target.get_node()
        if node.get_type_name() in ("Convert", "Reshape"):
            pending.extend(node.output(0).get_target_inputs())
        elif node.get_type_name() == "Subtract" and target.get_index() == 1:
            return True
    return False
