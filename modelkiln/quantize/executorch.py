"""The executorch format's scheme handlers, before the export: the quantized module is then
lowered to XNNPACK, which runs its int8 (and int8 x int4) kernels.

- int8-static: PT2E with ExecuTorch's XNNPACKQuantizer on the Linear layers: int8 weights
  (symmetric, per output channel or per tensor) and int8 inputs and outputs (asymmetric, per
  tensor), their ranges observed on the build's calibration feeds (`prepare_pt2e`, the
  feeds run through it, `convert_pt2e`);
- int8-dynamic: torchao's Int8DynamicActivationIntxWeightConfig on every Linear (int8
  weights, activations quantized per call), no calibration;
- int4-weights: the same config with int4 weights in groups of `group_size` input channels
  (ExecuTorch's "8da4w"): XNNPACK's blockwise 4-bit kernels, activations int8 per call.
XNNPACK's int8 is symmetric weights with asymmetric activations (nncf's "mixed" preset):
`quantization.symmetric = true` is refused, not approximated. Its grouped int4 has no zero
point, so there `symmetric` (of the weights) must be true. All need the XNNPACK
partitioner: the quantize / dequantize pairs are what it fuses into its int8 kernels.

A handler gets the module and the calibration feeds, not the component's spec: PT2E's graph
is captured from the first feed with every input's first axis as a free batch (what the
ViT's pixel_values is), so the exporter exports it again with its own batch.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln.backends import ProfileContext
from modelkiln.errors import QuantizationError, UnsupportedError, first_line
from modelkiln.quantize.handlers import Stage, handles
from modelkiln.quantize.schemes import Int4Weights, Int8Dynamic, Int8Static, SchemeConfig
from modelkiln.quantize.torch import module_bytes, tensor_bytes
from modelkiln.runtimes.executorch import ExecuTorchSettings

if TYPE_CHECKING:
    from modelkiln.quantize import Calibration

logger = logging.getLogger(__name__)

XnnpackScheme = Int8Static | Int8Dynamic
# The ops whose weights the quantizer gives one dequantize each: what we count as quantized.
WEIGHT_DEQUANTIZE = ("dequantize_per_channel", "dequantize_per_tensor")
# XNNPACK's blockwise 4-bit weights take groups of a multiple of this many input channels
# (its lowering asserts it; torchao quantizes any group size that divides in_features).
XNNPACK_GROUP_MULTIPLE = 32


def _needs_xnnpack(config: SchemeConfig, context: ProfileContext) -> None:
    partitioner = ExecuTorchSettings.of(context.profile).partitioner
    if partitioner != "xnnpack":
        raise UnsupportedError(
            f"{context.origin}: {config.name} quantizes for XNNPACK's int8 kernels, and "
            f"executorch.partitioner is '{partitioner}'; set executorch.partitioner = 'xnnpack' "
            "or quantization.scheme = 'none'"
        )


def xnnpack_only(config: XnnpackScheme, context: ProfileContext) -> None:
    """XNNPACK's int8: the xnnpack partitioner, symmetric weights with asymmetric activations,
    and (static) min/max activation ranges."""
    _needs_xnnpack(config, context)
    if config.symmetric:
        raise UnsupportedError(
            f"{context.origin}: XNNPACK's {config.name} has symmetric int8 weights and "
            "asymmetric activations; set quantization.symmetric = false"
        )
    if isinstance(config, Int8Dynamic) and not config.per_channel:
        raise UnsupportedError(
            f"{context.origin}: torchao's int8 dynamic-activation weights for XNNPACK have one "
            "scale per output channel (or group), not per tensor; set "
            "quantization.per_channel = true"
        )
    if isinstance(config, Int8Static) and config.method != "minmax":
        raise UnsupportedError(
            f"{context.origin}: the executorch {config.name} takes activation ranges by "
            f"min/max, not {config.method}; set quantization.method = 'minmax'"
        )


def xnnpack_int4(config: Int4Weights, context: ProfileContext) -> None:
    """XNNPACK's blockwise int4 weights: the xnnpack partitioner, every Linear in 4 bits,
    symmetric groups of a multiple of 32 input channels."""
    _needs_xnnpack(config, context)
    if config.ratio != 1.0:
        raise UnsupportedError(
            f"{context.origin}: the executorch int4-weights puts every Linear in int4 (there "
            f"is no int8 share to split, as nncf does), got quantization.ratio = "
            f"{config.ratio}; set quantization.ratio = 1.0"
        )
    if not config.symmetric:
        # XNNPACK's grouped int4 stores scales only: the lowering drops torchao's zero points
        # and the program silently computes other numbers (cosine 0.91 to the eager module
        # on the tiny ViT), although every Linear is delegated.
        raise UnsupportedError(
            f"{context.origin}: XNNPACK's 4-bit grouped weights have no zero point (lowering "
            "drops asymmetric ones and changes the results); set quantization.symmetric = true"
        )
    if config.group_size % XNNPACK_GROUP_MULTIPLE:
        raise UnsupportedError(
            f"{context.origin}: XNNPACK's 4-bit kernels take groups of a multiple of "
            f"{XNNPACK_GROUP_MULTIPLE} weights, got quantization.group_size = "
            f"{config.group_size}; set quantization.group_size = 32 (or 64, 128, ...)"
        )


def quantization_config(config: XnnpackScheme) -> Any:
    """XNNPACKQuantizer's symmetric config, with min/max observers for static activations (the
    quantizer's default is a histogram observer)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        get_symmetric_quantization_config,
    )

    dynamic = isinstance(config, Int8Dynamic)
    base = get_symmetric_quantization_config(is_per_channel=config.per_channel, is_dynamic=dynamic)
    if dynamic:
        return base
    from torchao.quantization.pt2e import MinMaxObserver

    observer = MinMaxObserver.with_args(eps=2**-12)
    spec = replace(base.input_activation, observer_or_fake_quant_ctr=observer)
    return replace(base, input_activation=spec, output_activation=spec)


def _captured(module: Any, calibration: Calibration) -> Any:
    """The module as a graph (torch.export, then .module()), every input's first axis free."""
    import torch

    first = calibration[0]
    # An example batch of 1 would specialise the axis: the first feed, twice.
    example = tuple(
        torch.from_numpy(np.ascontiguousarray(np.concatenate([a, a]) if len(a) == 1 else a))
        for a in first.values()
    )
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} for _ in example)
    with torch.no_grad():
        return torch.export.export(module, example, dynamic_shapes=shapes, strict=False).module()


def _count(graph_module: Any) -> tuple[int, int]:
    """(weight dequantizes, activation quantizes) in a converted graph."""
    weights = activations = 0
    for node in graph_module.graph.nodes:
        target = str(node.target)
        if node.op != "call_function" or "quantized_decomposed" not in target:
            continue
        first = node.args[0] if node.args else None
        constant = getattr(first, "op", None) == "get_attr"
        if constant and any(name in target for name in WEIGHT_DEQUANTIZE):
            weights += 1
        elif not constant and "quantize_per_tensor" in target and "dequantize" not in target:
            activations += 1
    return weights, activations


def _constant_bytes(graph_module: Any) -> int:
    """Bytes of the tensors a converted graph reads (get_attr: its int8 weights and the float
    parameters left), each once; parameters the graph no longer reads are not counted."""
    import torch

    used: dict[int, torch.Tensor] = {}
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            value = graph_module
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            if isinstance(value, torch.Tensor):
                used[id(value)] = value
    return sum(t.numel() * t.element_size() for t in used.values())


@handles(Int8Static, "executorch", stage=Stage.BEFORE_EXPORT, check=xnnpack_only)
def pt2e_int8_static(
    module: Any, settings: Int8Static, calibration: Calibration = ()
) -> tuple[Any, dict[str, Any]]:
    """The module quantized by PT2E for XNNPACK: a GraphModule holding int8 weights and the
    quantize / dequantize pairs the XNNPACK partitioner lowers to its int8 kernels."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not calibration:
        raise QuantizationError(
            f"{settings.name} needs calibration data: set [calibration] data in the profile "
            "(--set calibration.data=DIR), or pick int8-dynamic"
        )
    before = module_bytes(module)
    # Linear layers only: quantizing the residual adds as well (set_global) costs the tiny
    # ViT a cosine of 0.95 instead of 0.995, and XNNPACK runs them in fp32 at little cost.
    quantizer = XNNPACKQuantizer().set_module_type(torch.nn.Linear, quantization_config(settings))
    try:
        prepared = prepare_pt2e(_captured(module, calibration), quantizer)
        with torch.no_grad():
            for feed in calibration:
                prepared(*(torch.from_numpy(np.ascontiguousarray(a)) for a in feed.values()))
        converted = convert_pt2e(prepared)
    except (RuntimeError, ValueError, TypeError) as error:  # torch.export / PT2E failures
        raise QuantizationError(f"PT2E {settings.name} failed: {first_line(error)}") from error
    weights, activations = _count(converted)
    return converted, {
        "quantized_weights": weights,
        "quantized_activations": activations,
        "quantizer": "XNNPACKQuantizer (PT2E)",
        "per_channel": settings.per_channel,
        "activations": "int8 around each Linear, static per tensor, min/max of the feeds",
        "calibration_batches": len(calibration),
        "bytes_before": before,
        "bytes_after": _constant_bytes(converted),
    }


@handles(Int8Dynamic, "executorch", stage=Stage.BEFORE_EXPORT, check=xnnpack_only)
def torchao_int8_dynamic(
    module: Any, settings: Int8Dynamic, calibration: Calibration = ()
) -> tuple[Any, dict[str, Any]]:
    """Every Linear quantized in place by torchao's Int8DynamicActivationIntxWeightConfig
    (int8 weights, activations quantized per call per token), which the XNNPACK partitioner
    lowers to its dynamically quantized kernels. No calibration: nothing is observed."""
    import torch
    from torchao.quantization.granularity import PerAxis

    quantized, count, before = _torchao_linears(
        module, settings, weight_dtype=torch.int8, weight_granularity=PerAxis(0)
    )
    return quantized, {
        "quantized_weights": count,
        "quantizer": "torchao Int8DynamicActivationIntxWeightConfig",
        "per_channel": settings.per_channel,
        "activations": "int8, dynamic per token",
        "bytes_before": before,
        "bytes_after": module_bytes(quantized),
    }


@handles(Int4Weights, "executorch", stage=Stage.BEFORE_EXPORT, check=xnnpack_int4)
def torchao_int4_weights(
    module: Any, settings: Int4Weights, calibration: Calibration = ()
) -> tuple[Any, dict[str, Any]]:
    """Every Linear quantized in place by torchao's Int8DynamicActivationIntxWeightConfig with
    symmetric int4 weights in groups of `group_size` input channels (ExecuTorch's 8da4w),
    which the XNNPACK partitioner lowers to its blockwise 4-bit kernels with int8 activations
    quantized per call. No calibration."""
    import torch
    from torchao.quantization import MappingType
    from torchao.quantization.granularity import PerGroup

    _check_groups(_linears(module), settings.group_size)
    quantized, count, before = _torchao_linears(
        module,
        settings,
        weight_dtype=torch.int4,  # type: ignore[attr-defined]  # absent from torch's stubs
        weight_granularity=PerGroup(settings.group_size),
        # The profile check refuses asymmetric: XNNPACK has no int4 zero point.
        weight_mapping_type=MappingType.SYMMETRIC,
    )
    return quantized, {
        "quantized_weights": count,
        "quantizer": "torchao Int8DynamicActivationIntxWeightConfig",
        "symmetric": True,
        "group_size": settings.group_size,
        "activations": "int8, dynamic per token",
        "bytes_before": before,
        "bytes_after": _packed_bytes(quantized),
    }


def _linears(module: Any) -> list[tuple[str, Any]]:
    """The module's Linear layers with their names."""
    import torch

    return [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def _torchao_linears(module: Any, settings: SchemeConfig, **weights: Any) -> tuple[Any, int, int]:
    """A copy of module with every Linear quantized by torchao's
    Int8DynamicActivationIntxWeightConfig(**weights) (int8 activations per call, what the
    XNNPACK partitioner lowers): (the copy, its quantized Linears, the bytes before)."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_

    # A copy: the family's loader may hand the same module to the torch reference.
    module = copy.deepcopy(module)
    before = module_bytes(module)
    linears = [layer for _, layer in _linears(module)]
    try:
        quantize_(module, Int8DynamicActivationIntxWeightConfig(**weights))
    except (AssertionError, RuntimeError, ValueError, TypeError) as error:  # torchao asserts
        raise QuantizationError(f"torchao {settings.name} failed: {first_line(error)}") from error
    quantized = sum(type(m.weight) not in (torch.Tensor, torch.nn.Parameter) for m in linears)
    return module, quantized, before


def _check_groups(linears: list[tuple[str, Any]], group_size: int) -> None:
    """Every Linear's in_features a multiple of group_size (torchao asserts it mid-module),
    else the error names the layer and the largest group size that suits every layer."""
    widths = [layer.in_features for _, layer in linears]
    for name, layer in linears:
        if layer.in_features % group_size == 0:
            continue
        common = math.gcd(*widths)
        fits = [
            size
            for size in range(XNNPACK_GROUP_MULTIPLE, common + 1, XNNPACK_GROUP_MULTIPLE)
            if common % size == 0
        ]
        fix = (
            f"set quantization.group_size = "
            f"{max((s for s in fits if s <= group_size), default=fits[0])}"
            if fits
            else f"no multiple of {XNNPACK_GROUP_MULTIPLE} divides every Linear's in_features: "
            "use scheme 'int8-dynamic'"
        )
        raise QuantizationError(
            f"Linear '{name}' has in_features {layer.in_features}, which "
            f"quantization.group_size {group_size} does not divide; {fix}"
        )


def _packed_bytes(module: Any) -> int:
    """Bytes of the module's tensors as the lowered program stores them. torchao holds each
    int4 value in an int8 byte (IntxUnpackedToInt8Tensor); XNNPACK packs two to a byte, keeps
    one bf16 scale per group and no zero point (all 0: symmetric). ViT-B/16: 57.0 MB counting
    the module's fp32 scales, 51.7 MB so, and the .pte is 51.5 MB. Other tensors as
    module_bytes counts them."""
    import torch
    from torchao.quantization.quant_primitives import _DTYPE_TO_BIT_WIDTH

    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        bits = _DTYPE_TO_BIT_WIDTH.get(getattr(tensor, "target_dtype", None))
        if bits is None or not hasattr(tensor, "qdata"):
            total += tensor_bytes(tensor)
            continue
        scales = tensor.scale.numel() * torch.bfloat16.itemsize
        total += math.ceil(tensor.qdata.numel() * bits / 8) + scales
    return total
