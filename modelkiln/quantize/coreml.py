"""The coreml format's scheme handlers: weight compression with coremltools.optimize.coreml on
the saved ML Program.

- int8-weights: linear, one scale per output channel (constexpr ops of iOS16+);
- int4-weights: linear, one scale per block of `group_size` input channels (iOS18+);
- palettize4-weights: a 16-entry lookup table chosen by k-means or uniformly, one per tensor
  below iOS18, one per group of output channels from iOS18;
- nf4-weights: palettization with the fixed NormalFloat-4 table scaled by each group's absmax,
  i.e. NF4 as Core ML runs it (a lookup table, no NF4 kernel); needs iOS18 for its groups.
Only weights above coremltools' size threshold are compressed (its default: 2048 elements).
Activations stay in the program's precision: Core ML's activation quantization calibrates by
running the model, which needs macOS.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln.backends import ProfileContext
from modelkiln.errors import QuantizationError, UnsupportedError
from modelkiln.quantize.handlers import handles
from modelkiln.quantize.schemes import Int4Weights, Int8Weights, NF4Weights, Palettize4Weights
from modelkiln.quiet import printing_into
from modelkiln.runtimes.coreml import CoreMLSettings, import_coremltools

if TYPE_CHECKING:
    from modelkiln.quantize import Calibration

CompressionScheme = Int8Weights | Int4Weights | NF4Weights | Palettize4Weights

logger = logging.getLogger(__name__)

# The 16 NormalFloat-4 levels of QLoRA (Dettmers et al. 2023, arXiv:2305.14314, appendix E).
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip
# Output channels that share one lookup table (iOS18's grouped palettization); Apple's
# recommendation for 4-bit palettization of transformers.
LUT_CHANNEL_GROUP = 16
# Ops coremltools writes for compressed weights, counted in the record.
COMPRESSED_OPS = frozenset(
    {
        "constexpr_affine_dequantize",
        "constexpr_blockwise_shift_scale",
        "constexpr_lut_to_dense",
    }
)
# Deployment targets from which grouped lookup tables and int4 / per-block scales exist.
IOS18_TARGETS = frozenset({"iOS18", "macOS15"})


def nf4_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """coremltools' custom lookup-table function: the NF4 levels scaled by the absmax of the
    weights it is given (a tensor or one channel group), and each weight's nearest level."""
    absmax = float(np.abs(weights).max())
    table = (NF4_LEVELS * (absmax if absmax > 0 else 1.0)).astype(weights.dtype)
    indices = np.abs(weights.reshape(-1, 1) - table.reshape(1, -1)).argmin(axis=1)
    return table, indices.astype(np.uint8).reshape(weights.shape)


def needs_ios18(config: Int4Weights | NF4Weights, context: ProfileContext) -> None:
    """int4's per-block scales and NF4's per-group lookup tables are ops of iOS18 / macOS15."""
    target = CoreMLSettings.of(context.profile).target
    if target not in IOS18_TARGETS:
        raise UnsupportedError(
            f"{context.origin}: Core ML runs {config.name} from iOS18 / macOS15 "
            f"(per-block int4 scales, per-group lookup tables), not {target}; "
            "set coreml.target = 'iOS18' (or 'macOS15'), or use int8-weights or "
            "palettize4-weights"
        )


def op_config(settings: CompressionScheme, target: str) -> Any:
    """The coremltools op config of a scheme (refused where the target lacks the ops)."""
    import coremltools.optimize.coreml as cto

    grouped = target in IOS18_TARGETS
    if isinstance(settings, Int8Weights | Int4Weights):
        mode = "linear_symmetric" if settings.symmetric else "linear"
        if isinstance(settings, Int8Weights):
            return cto.OpLinearQuantizerConfig(mode=mode, dtype="int8", granularity="per_channel")
        return cto.OpLinearQuantizerConfig(
            mode=mode, dtype="int4", granularity="per_block", block_size=settings.group_size
        )
    granularity: dict[str, Any] = (
        {"granularity": "per_grouped_channel", "group_size": LUT_CHANNEL_GROUP}
        if grouped
        else {"granularity": "per_tensor"}
    )
    if isinstance(settings, Palettize4Weights):
        return cto.OpPalettizerConfig(mode=settings.palettization, nbits=4, **granularity)
    return cto.OpPalettizerConfig(mode="custom", lut_function=nf4_table, **granularity)


def compressed_ops(model: Any) -> Counter[str]:
    """Op types of the program's main function, as saved."""
    spec = model.get_spec()
    function = spec.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    return Counter(op.type for op in block.operations)


def package_bytes(package: Path) -> int:
    return sum(path.stat().st_size for path in package.rglob("*") if path.is_file())


@handles(Int8Weights, "coreml")
@handles(Palettize4Weights, "coreml")
@handles(Int4Weights, "coreml", check=needs_ios18)
@handles(NF4Weights, "coreml", check=needs_ios18)
def compress_weights(
    entry: Path, settings: CompressionScheme, calibration: Calibration = ()
) -> dict[str, Any]:
    """Compress the weights of the .mlpackage at `entry` in place; the record says how."""
    ct = import_coremltools()
    import coremltools.optimize.coreml as cto

    before = package_bytes(entry)
    model = ct.models.MLModel(str(entry), skip_model_load=True)
    target = model.user_defined_metadata.get("modelkiln.target", "iOS17")
    config = cto.OptimizationConfig(global_config=op_config(settings, target))
    captured = io.StringIO()
    try:
        with printing_into(captured, stderr=True):
            if isinstance(settings, Int8Weights | Int4Weights):
                compressed = cto.linear_quantize_weights(model, config)
            else:
                compressed = cto.palettize_weights(model, config)
    except (ValueError, NotImplementedError) as error:
        logger.debug("coremltools output:\n%s", captured.getvalue())
        raise QuantizationError(
            f"coremltools refused {settings.name}: {str(error).strip().splitlines()[0]}"
        ) from error
    ops = {op: n for op, n in compressed_ops(compressed).items() if op in COMPRESSED_OPS}
    # Save beside, then swap: a failed save leaves the exported package as it was.
    staged = entry.with_name(f".compressed-{entry.name}")
    compressed.save(str(staged))
    _replace_directory(entry, staged)
    record: dict[str, Any] = {
        "quantized_weights": sum(ops.values()),
        "ops": ops,
        "target": target,
        "bytes_before": before,
        "bytes_after": package_bytes(entry),
    }
    if isinstance(settings, Int8Weights | Int4Weights):
        record["symmetric"] = settings.symmetric
        record["granularity"] = "per_channel" if isinstance(settings, Int8Weights) else "per_block"
        if isinstance(settings, Int4Weights):
            record["block_size"] = settings.group_size
    else:
        record["lookup_table"] = (
            f"per {LUT_CHANNEL_GROUP} output channels" if target in IOS18_TARGETS else "per tensor"
        )
        record["mode"] = (
            settings.palettization if isinstance(settings, Palettize4Weights) else "nf4"
        )
    return record


def _replace_directory(target: Path, new: Path) -> None:
    import shutil

    old = target.with_name(f".old-{target.name}")
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old)
