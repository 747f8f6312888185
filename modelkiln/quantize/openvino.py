"""OpenVINO weight compression with nncf (int8, int4, nf4; activations stay floating point)."""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import QuantizationError
from modelkiln.exporters.base import first_line

if TYPE_CHECKING:
    from modelkiln.profiles import QuantizationSettings

logger = logging.getLogger(__name__)
LOW_PRECISION = {"i8", "u8", "i4", "u4", "nf4"}


def _mode(settings: QuantizationSettings) -> str:
    if settings.scheme == "nf4-weights":
        return "NF4"
    bits = "INT8" if settings.scheme == "int8-weights" else "INT4"
    return f"{bits}_{'SYM' if settings.symmetric else 'ASYM'}"


def compress_weights(entry: Path, settings: QuantizationSettings) -> dict[str, Any]:
    """nncf.compress_weights on the IR; int4/nf4 use settings.group_size and ratio (the rest
    of the layers, and embeddings and the last layer, stay int8 as nncf decides)."""
    import nncf
    import openvino as ov

    weights = entry.with_suffix(".bin")
    before_bytes = entry.stat().st_size + weights.stat().st_size
    model = ov.Core().read_model(entry)
    before = _low_precision_constants(model)
    mode = _mode(settings)
    options: dict[str, Any] = {}
    if mode != "INT8_SYM" and mode != "INT8_ASYM":
        options = {"group_size": settings.group_size, "ratio": settings.ratio}
    captured = io.StringIO()
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    try:
        # nncf logs its bit-width table and prints a progress bar; the library never prints.
        nncf_logger.setLevel(max(level, logging.WARNING))
        with contextlib.redirect_stdout(captured):
            compressed = nncf.compress_weights(
                model, mode=getattr(nncf.CompressWeightsMode, mode), **options
            )
    except Exception as error:  # nncf raises many unrelated types
        logger.debug("nncf output:\n%s", captured.getvalue())
        hint = ""
        if "group size" in str(error):
            hint = (
                f"; quantization.group_size = {settings.group_size} must divide the input "
                "channels of every layer: pick a divisor of the model's hidden size (64, 32, ...)"
            )
        raise QuantizationError(
            f"nncf {mode.lower()} weight compression failed: {first_line(error)}{hint}"
        ) from error
    finally:
        nncf_logger.setLevel(level)
    logger.debug("nncf output:\n%s", captured.getvalue())
    after = _low_precision_constants(compressed)
    # Save beside, then swap: the original .bin is memory-mapped by the model we read.
    staged = entry.with_name(f"{entry.stem}.compressed.xml")
    ov.save_model(compressed, str(staged), compress_to_fp16=False)
    del model, compressed
    staged.replace(entry)
    staged.with_suffix(".bin").replace(weights)
    return {
        "quantized_weights": sum(after.values()) - sum(before.values()),
        "nncf_mode": mode.lower(),
        "weight_types": dict(after),
        **({"group_size": settings.group_size, "ratio": settings.ratio} if options else {}),
        "bytes_before": before_bytes,
        "bytes_after": entry.stat().st_size + weights.stat().st_size,
    }


def _low_precision_constants(model: Any) -> Counter[str]:
    """Weight constants stored in an integer or 4-bit type, by type. Zero points share the
    type but have a trailing dimension of 1 ([out, 1] or [out, groups, 1]): not counted."""
    types: Counter[str] = Counter()
    for op in model.get_ops():
        shape = list(op.get_output_shape(0)) if op.get_type_name() == "Constant" else []
        if len(shape) >= 2 and shape[-1] > 1:
            name = op.get_element_type().get_type_name()
            if name in LOW_PRECISION:
                types[name] += 1
    return types
