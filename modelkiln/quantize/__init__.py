"""Quantization: typed scheme configs (schemes.py), the handlers each backend registers for
its formats (handlers.py), and applying one to a component.

A handler returns what it did: how many weights it quantized, the ops it used and the size
before and after. The build validates the result against torch fp32 like any export, with the
profile's (quantization-appropriate) tolerances.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import QuantizationError
from modelkiln.quantize.handlers import (
    Handler,
    Stage,
    handler_for,
    handles,
    known_schemes,
    matrix_markdown,
    support,
    supported_schemes,
)
from modelkiln.quantize.schemes import SCHEMES, SchemeConfig
from modelkiln.records import QuantizationRecord

if TYPE_CHECKING:
    import numpy as np

# Real inputs of one component, by input name (empty for schemes that need none).
Calibration = Sequence[Mapping[str, "np.ndarray"]]


def quantize(
    entry: Path,
    format: str,
    config: SchemeConfig,
    component: str,
    calibration: Calibration = (),
) -> QuantizationRecord:
    """Quantize an exported component of `format` in place with the scheme's registered
    handler; the manifest's record of what it did."""
    handler = handler_for(format, config.name, component)
    if handler.stage is not Stage.AFTER_EXPORT:
        raise QuantizationError(
            f"{component}: {config.name} quantizes the torch module before {format} export, "
            "not an exported file: build with it instead"
        )
    return quantize_exported(handler, entry, config, component, calibration)


def quantize_exported(
    handler: Handler,
    entry: Path,
    config: SchemeConfig,
    component: str,
    calibration: Calibration = (),
) -> QuantizationRecord:
    """Apply an after-export handler to one exported component in place; the manifest's
    record of what it did."""
    try:
        report: dict[str, Any] = handler.apply(entry, config, calibration)
    except QuantizationError as error:
        raise QuantizationError(f"{component}: {error}") from error
    return _checked(report, config, component)


def quantize_module(
    handler: Handler,
    module: Any,
    config: SchemeConfig,
    component: str,
    calibration: Calibration = (),
) -> tuple[Any, QuantizationRecord]:
    """Apply a before-export handler to a component's torch module; the module to export and
    the manifest's record."""
    try:
        quantized, report = handler.apply(module, config, calibration)
    except QuantizationError as error:
        raise QuantizationError(f"{component}: {error}") from error
    return quantized, _checked(report, config, component)


def _checked(report: dict[str, Any], config: SchemeConfig, component: str) -> QuantizationRecord:
    if not report.get("quantized_weights"):
        raise QuantizationError(
            f"{component}: quantization.scheme '{config.name}' quantized no weight (the "
            "component may be below the tool's size thresholds, or its layers unsupported); "
            "use scheme 'none' for it"
        )
    return QuantizationRecord.of(config.name, report)


def check_calibration(
    calibration: Calibration,
    inputs: Mapping[str, tuple[Sequence[int | None], str]],
    scheme: str,
    alternative: str,
) -> None:
    """Calibration feeds against a model's inputs (name -> dims, None where dynamic, and the
    shape as the format prints it), before the tool runs: onnxruntime and nncf would fail
    mid-statistics with their own shape errors and no word about calibration."""
    if not calibration:
        raise QuantizationError(
            f"{scheme} needs calibration data: set [calibration] data (images) or prompts "
            f"(generative models) in the profile, or pick {alternative}"
        )
    for index, feed in enumerate(calibration):
        if set(feed) != set(inputs):
            raise QuantizationError(
                f"calibration feed {index} has inputs {sorted(feed)} but the model takes "
                f"{sorted(inputs)}: calibrate the component with its own inputs"
            )
        for name, (dims, shown) in inputs.items():
            shape = feed[name].shape
            fits = len(dims) == len(shape) and all(
                d in (None, n) for d, n in zip(dims, shape, strict=True)
            )
            if not fits:
                raise QuantizationError(
                    f"calibration feed {index}: input '{name}' has shape {list(shape)} but "
                    f"the model takes {shown}: export with shapes.dynamic_batch = true, or "
                    "calibrate with the export's batch size"
                )


__all__ = [
    "SCHEMES",
    "Calibration",
    "Handler",
    "SchemeConfig",
    "Stage",
    "check_calibration",
    "handler_for",
    "handles",
    "known_schemes",
    "matrix_markdown",
    "quantize",
    "quantize_exported",
    "quantize_module",
    "support",
    "supported_schemes",
]
