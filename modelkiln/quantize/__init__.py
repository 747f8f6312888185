"""Post-export quantization with each format's own tooling, and the one support matrix.

A scheme runs on the exported component files in place (onnxruntime.quantization for ONNX,
nncf for OpenVINO IR) and returns what it did: how many weights it quantized, the ops it
used and the size before and after. The build validates the result against torch fp32 like
any export, with the profile's (quantization-appropriate) tolerances.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import QuantizationError, UnsupportedError
from modelkiln.registry import Registry

if TYPE_CHECKING:
    import numpy as np

    from modelkiln.profiles import QuantizationSettings

NONE = "none"
# Real inputs of one component, by input name (empty for schemes that need none).
Calibration = Sequence[Mapping[str, "np.ndarray"]]
Quantizer = Callable[[Path, "QuantizationSettings", Calibration], dict[str, Any]]
# format -> scheme -> the function that applies it: the only place that says what exists.
SUPPORT: dict[str, Registry[Quantizer]] = {
    "onnx": Registry(
        "onnx quantization scheme",
        {
            "int8-dynamic": "modelkiln.quantize.onnx:int8_dynamic",
            "int8-static": "modelkiln.quantize.onnx:int8_static",
            "int4-weights": "modelkiln.quantize.onnx:int4_weights",
            "nf4-weights": "modelkiln.quantize.onnx:nf4_weights",
        },
    ),
    "openvino": Registry(
        "openvino quantization scheme",
        {
            "int8-weights": "modelkiln.quantize.openvino:compress_weights",
            "int4-weights": "modelkiln.quantize.openvino:compress_weights",
            "nf4-weights": "modelkiln.quantize.openvino:compress_weights",
            "int8-static": "modelkiln.quantize.openvino:int8_static",
            "int8-hybrid": "modelkiln.quantize.openvino:int8_hybrid",
        },
    ),
    "coreml": Registry(
        "coreml quantization scheme",
        {
            "int8-weights": "modelkiln.quantize.coreml:compress_weights",
            "int4-weights": "modelkiln.quantize.coreml:compress_weights",
            "nf4-weights": "modelkiln.quantize.coreml:compress_weights",
            "palettize4-weights": "modelkiln.quantize.coreml:compress_weights",
        },
    ),
    "tensorrt": Registry(
        "tensorrt quantization scheme",
        {
            "int8-static": "modelkiln.quantize.tensorrt:int8_static",
            "int4-weights": "modelkiln.quantize.tensorrt:int4_weights",
        },
    ),
    "torch": Registry(
        "torch quantization scheme",
        {
            "int8-weights": "modelkiln.quantize.torch:quantize_weights",
            "int4-weights": "modelkiln.quantize.torch:quantize_weights",
            "nf4-weights": "modelkiln.quantize.torch:quantize_weights",
        },
    ),
}
# Pairs that cannot exist, with the reason: the profile error says why, not only "no".
REJECTED: dict[tuple[str, str], str] = {
    ("tensorrt", "nf4-weights"): "TensorRT has no NF4 kernels, its 4-bit weights are INT4 "
    "or FP4: use int4-weights",
    ("tensorrt", "int8-dynamic"): "TensorRT takes int8 as explicit Q/DQ with calibrated "
    "activation scales: use int8-static",
    ("coreml", "int8-static"): "Core ML calibrates activations by running the model, which "
    "needs macOS: use int8-weights",
}
# Schemes whose quantizer needs real inputs of the component (the [calibration] section).
CALIBRATED = frozenset({"int8-static", "int8-hybrid"})
SCHEMES = (NONE, *sorted({scheme for schemes in SUPPORT.values() for scheme in schemes}))


def supported_schemes(format: str) -> list[str]:
    return [NONE, *(SUPPORT[format].names() if format in SUPPORT else [])]


def check_scheme(format: str, scheme: str, origin: str) -> None:
    """Profile validation: the (format, scheme) pair must be in the matrix."""
    if scheme in supported_schemes(format):
        return
    if scheme not in SCHEMES:
        raise UnsupportedError(
            f"{origin}: quantization.scheme '{scheme}' is unknown; known: {', '.join(SCHEMES)}"
        )
    formats = [name for name, schemes in SUPPORT.items() if scheme in schemes]
    reason = REJECTED.get((format, scheme))
    raise UnsupportedError(
        f"{origin}: format '{format}' has no quantization scheme '{scheme}'"
        f"{f' ({reason})' if reason else ''}; for {format}: "
        f"{', '.join(supported_schemes(format))}; '{scheme}' is available for: "
        f"{', '.join(formats)}"
    )


def quantize(
    entry: Path,
    format: str,
    settings: QuantizationSettings,
    component: str,
    calibration: Calibration = (),
) -> dict[str, Any]:
    """Quantize one exported component in place; returns the manifest's record of it."""
    try:
        record = SUPPORT[format].get(settings.scheme)(entry, settings, calibration)
    except QuantizationError as error:
        raise QuantizationError(f"{component}: {error}") from error
    if not record.get("quantized_weights"):
        raise QuantizationError(
            f"{component}: quantization.scheme '{settings.scheme}' quantized no weight (the "
            "component may be below the tool's size thresholds, or its layers unsupported); "
            "use scheme 'none' for it"
        )
    return {"scheme": settings.scheme, **record}


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
            f"(diffusion models) in the profile, or pick {alternative}"
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


def matrix_markdown() -> str:
    """The README's support table, from SUPPORT."""
    formats = list(SUPPORT)
    lines = ["| scheme | " + " | ".join(formats) + " |", "| --- |" + " --- |" * len(formats)]
    for scheme in SCHEMES[1:]:
        cells = ["yes" if scheme in SUPPORT[f] else "—" for f in formats]
        lines.append(f"| `{scheme}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = [
    "SCHEMES",
    "SUPPORT",
    "check_calibration",
    "check_scheme",
    "matrix_markdown",
    "quantize",
    "supported_schemes",
]
