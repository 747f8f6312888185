"""A component larger than memory, built one block at a time (OpenVINO; ONNX int4).

For SD 3.5 Large's transformer (8 B parameters, 32 GB in fp32) or T5-XXL on a 24 GB machine.
The component is cut into the blocks it runs in order (models/blocks.py); each block's weights
are read from the checkpoint shards only while it runs (`BlockWeights`), so that its torch
outputs, the reference of the validation, are computed one block in memory at a time.
- OpenVINO (exporters/by_block_openvino.py): each block converted, compressed and scored
  alone and in a chain, the IR blocks joined into one model.
- ONNX with int4 weights (`export_onnx`): the component is exported whole but streamed, its
  weights read from the checkpoint and quantized to MatMulNBits one at a time as the file is
  written (quantize/onnx_streamed.py).
The builder runs the saved component whole against the torch outputs the blocks computed, a
reference no machine of this size could compute in one piece, where that check fits the
memory budget (the runtime holds the file's weights and its own repacked copy: about twice
the file); otherwise, for OpenVINO, the chain of compressed blocks is the component's
validation, and the manifest says so. `needed_bytes` says what a build holds before a byte
of weight is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modelkiln import memory_budget
from modelkiln.diffusion.block_cache import FIRST_BLOCK_RESIDUAL
from modelkiln.errors import ProfileError
from modelkiln.exporters import by_block_openvino
from modelkiln.exporters.base import write_config
from modelkiln.exporters.block_run import (
    WHOLE_CHECK_ACTIVATIONS,
    WHOLE_CHECK_COPIES,
    BlockBuild,
    open_blocks,
    reference,
)
from modelkiln.models.blocks import SEGMENTERS, segments
from modelkiln.progress import Progress
from modelkiln.quantize.schemes import Int4Weights, Int8Weights, NF4Weights
from modelkiln.records import QuantizationRecord

if TYPE_CHECKING:
    from modelkiln.models.blocks import Segment
    from modelkiln.plan import BuildPlan, ComponentPlan
    from modelkiln.runtimes.base import RuntimeOptions
    from modelkiln.specs import ComponentSpec

# Bytes per fp32 byte of the saved IR, per what its weights become (scales included).
WEIGHT_SHARE = {"fp32": 1.0, "fp16": 0.5, "int8-weights": 0.26}
FOUR_BIT_SHARE = 0.16  # int4 / nf4 in groups of 64: half a byte and a scale per group
# One block in fp32 is held about this often at once: torch, its IR copy, the compressed IR.
BLOCK_COPIES = 3


def refusal(spec: ComponentSpec, component: ComponentPlan) -> str | None:
    """Why the component cannot be built block by block, or None if it can."""
    profile = component.profile
    if FIRST_BLOCK_RESIDUAL in spec.outputs:
        # The blocks' segments (models/blocks.py) do not output First Block Cache's residuals.
        return (
            "built for model.first_block_cache, the transformer and its head are built whole "
            "(their residuals are not cut into blocks); raise build.max_memory_gb or build "
            "without model.first_block_cache"
        )
    if profile.export.format == "onnx":
        if not isinstance(component.scheme, Int4Weights):
            scheme = component.scheme.name if component.scheme is not None else "fp32"
            return (
                "block by block, ONNX takes int4-weights only (quantized as the file is written; "
                f"{scheme} needs the whole model in memory); OpenVINO takes fp32/int8/int4/nf4"
            )
    elif profile.export.format != "openvino":
        return f"block-by-block builds write OpenVINO IR or ONNX, not {profile.export.format}"
    if spec.meta_module is None or not spec.checkpoint:
        return f"{spec.name} has no safetensors checkpoint to read one block at a time"
    if component.scheme is not None and not isinstance(
        component.scheme, by_block_openvino.BY_BLOCK_SCHEMES
    ):
        return (
            f"the {component.scheme.name} scheme calibrates the whole component; block by block "
            "only weight compression applies (int8-weights, int4-weights, nf4-weights)"
        )
    return None


def choose(
    specs: Sequence[ComponentSpec],
    plan: BuildPlan,
    estimate: memory_budget.Estimate | None,
    limit: float,
) -> tuple[set[str], memory_budget.Estimate | None]:
    """The components to build block by block ([build] by_block), and the estimate with what
    they hold instead of their fp32 modules (and why others that do not fit cannot)."""
    setting = plan.profile.build.by_block
    if setting == "never":
        return set(), estimate
    chosen: set[str] = set()
    held: dict[str, int] = {}
    refused: dict[str, str] = {}
    for spec in specs:
        if setting == "auto" and (estimate is None or estimate.fits_whole(spec.name, limit)):
            continue
        component = plan.component(spec.name)
        reason = refusal(spec, component)
        pieces = cut(spec) if reason is None else None
        if reason is None and pieces is None:
            reason = f"modelkiln cuts only {', '.join(SEGMENTERS)} into blocks"
        if reason is not None or pieces is None:
            refused[spec.name] = reason or ""
            continue
        chosen.add(spec.name)
        held[spec.name] = needed_bytes(pieces, component)
    if setting == "always" and not chosen:
        reasons = "; ".join(f"{name}: {why}" for name, why in refused.items())
        raise ProfileError(
            f"{plan.origin}: build.by_block = 'always' but no component can be built block "
            f"by block ({reasons})"
        )
    if estimate is not None:
        estimate = replace(estimate, by_block=held, not_by_block=refused)
    return chosen, estimate


def cut(spec: ComponentSpec) -> list[Segment] | None:
    """The component's blocks on the meta device, or None if its model cannot be cut."""
    assert spec.meta_module is not None
    return segments(spec.meta_module(), tuple(spec.outputs))


def needed_bytes(pieces: Sequence[Segment], component: ComponentPlan) -> int:
    """What the build holds at its peak for this component (weights only)."""
    total = sum(piece.weight_bytes() for piece in pieces)
    largest = max(piece.weight_bytes() for piece in pieces)
    scheme = component.scheme
    if scheme is None:
        share = WEIGHT_SHARE[component.profile.precision.weights]
    elif isinstance(scheme, Int8Weights):
        share = WEIGHT_SHARE["int8-weights"]
    else:
        assert isinstance(scheme, Int4Weights | NF4Weights)
        ratio = float(scheme.ratio)
        share = ratio * FOUR_BIT_SHARE + (1 - ratio) * WEIGHT_SHARE["int8-weights"]
    if component.profile.export.format == "onnx":
        # Nothing is held while the file is written: the torch reference holds one block,
        # the whole check the int4 model.
        whole_check = WHOLE_CHECK_COPIES * total * share + WHOLE_CHECK_ACTIVATIONS  # ORT
        return int(max(BLOCK_COPIES * largest, whole_check))
    # The blocks done plus one in the making. The whole check after them runs only where it
    # fits the budget (BlockBuild.whole_check_bytes); the chain of blocks validates otherwise.
    return int(total * share + BLOCK_COPIES * largest)


def export(
    spec: ComponentSpec,
    component: ComponentPlan,
    options: RuntimeOptions,
    root: Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    progress: Progress,
) -> BlockBuild:
    """Build the component under `root` block by block in its profile's format."""
    if component.profile.export.format == "onnx":
        return export_onnx(spec, component, root, feeds, progress)
    return by_block_openvino.export(spec, component, options, root, feeds, progress)


def export_onnx(
    spec: ComponentSpec,
    component: ComponentPlan,
    root: Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    progress: Progress,
) -> BlockBuild:
    """ONNX with int4 weights quantized as the streamed export is written; the torch
    reference of the feeds computed block by block."""
    from modelkiln.exporters.onnx import MODEL_FILE as ONNX_FILE
    from modelkiln.exporters.onnx import onnx_streamed_int4
    from modelkiln.quantize.onnx import external_data_path, model_bytes

    scheme = component.scheme
    assert isinstance(scheme, Int4Weights)
    pieces, weights = open_blocks(spec)
    expected = reference(spec, pieces, weights, feeds, progress)
    directory = root / spec.path
    entry = directory / ONNX_FILE
    with progress.task(f"exporting {spec.name} to onnx, {scheme.name} quantized as written"):
        report = onnx_streamed_int4(spec, component.profile, scheme, entry)
    write_config(spec, directory)
    report["bytes_before"] = sum(piece.weight_bytes() for piece in pieces)
    report["bytes_after"] = model_bytes(entry, external_data_path(entry))
    return BlockBuild(entry, expected, QuantizationRecord.of(scheme.name, report))


__all__ = ["choose", "cut", "export", "export_onnx", "needed_bytes", "refusal"]
