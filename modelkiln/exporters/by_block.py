"""A component larger than memory, built one block at a time (OpenVINO).

For SD 3.5 Large's transformer (8 B parameters, 32 GB in fp32) or T5-XXL on a 24 GB machine.
The component is cut into the blocks it runs in order (models/blocks.py). For each block in
turn: its weights are read from the checkpoint shards into the meta-device model (fp32, one
block: ~0.9 GB for SD 3.5 Large), it runs in torch on the activations the blocks before it
produced, is converted to OpenVINO (a copy, so the torch weights go right after), its weights
compressed (int8 / int4 / nf4 with nncf) and the compressed block run on the same inputs:
its score against torch goes to the manifest (validation.by_block) and names the block where
the error entered if the whole check fails; NaN or inf stops the build there. The IR blocks
are then joined into one model, each block's inputs wired to the outputs that made them, and
saved. The builder then runs the whole component against the torch outputs the blocks
computed one at a time: the validation of a whole build, with a
reference no machine of this size could compute in one piece.

Held at the peak: the compressed blocks made so far, plus one block in fp32 about three times
(torch, its IR copy, the compressed IR being made). `needed_bytes` says how much before a
byte of weight is read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln import memory_budget
from modelkiln.env import release_memory
from modelkiln.errors import (
    ExportError,
    ProfileError,
    UnsupportedError,
    ValidationError,
    first_line,
)
from modelkiln.evaluation.metrics import OutputMetrics
from modelkiln.exporters.base import export_dims
from modelkiln.exporters.onnx import WRAPPER_PREFIX, checkpoint_index
from modelkiln.exporters.openvino import MODEL_FILE
from modelkiln.models.blocks import SEGMENTERS, segments
from modelkiln.progress import Progress
from modelkiln.quantize.openvino import compress_model, low_precision_constants, nncf_mode
from modelkiln.quantize.schemes import Int4Weights, Int8Weights, NF4Weights
from modelkiln.records import OutputScore, QuantizationRecord

if TYPE_CHECKING:
    import torch

    from modelkiln.models.blocks import Segment
    from modelkiln.plan import BuildPlan, ComponentPlan
    from modelkiln.runtimes.base import RuntimeOptions
    from modelkiln.specs import ComponentSpec

logger = logging.getLogger(__name__)

BY_BLOCK_SCHEMES = (Int8Weights, Int4Weights, NF4Weights)
# Bytes per fp32 byte of the saved IR, per what its weights become (scales included).
WEIGHT_SHARE = {"fp32": 1.0, "fp16": 0.5, "int8-weights": 0.26}
FOUR_BIT_SHARE = 0.16  # int4 / nf4 in groups of 64: half a byte and a scale per group
# One block in fp32 is held about this often at once: torch, its IR copy, the compressed IR.
BLOCK_COPIES = 3
FINAL_CHECK_FACTOR = 1.25


@dataclass(frozen=True)
class BlockBuild:
    entry: Path
    # The component's torch outputs on each validation feed, computed block by block.
    expected: list[dict[str, np.ndarray]]
    blocks: dict[str, OutputScore]  # each block alone against torch, on the same inputs
    quantization: QuantizationRecord | None


def refusal(spec: ComponentSpec, component: ComponentPlan) -> str | None:
    """Why the component cannot be built block by block, or None if it can."""
    profile = component.profile
    if profile.export.format != "openvino":
        return f"block-by-block builds write OpenVINO IR, not {profile.export.format}"
    if spec.meta_module is None or not spec.checkpoint:
        return f"{spec.name} has no safetensors checkpoint to read one block at a time"
    if component.scheme is not None and not isinstance(component.scheme, BY_BLOCK_SCHEMES):
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
    # While blocks are made: those done plus one in the making; once joined, the runtime
    # compiles the saved IR for the final check beside nothing else (its weights repacked,
    # the file's pages mapped but reclaimable).
    return int(max(total * share + BLOCK_COPIES * largest, FINAL_CHECK_FACTOR * total * share))


class BlockWeights:
    """Reads one segment's weights from the checkpoint into the meta-device model, and puts
    the meta tensors back afterwards (the memory goes with them)."""

    def __init__(self, wrapper: torch.nn.Module, checkpoint: tuple[Path, ...]) -> None:
        self.index = checkpoint_index(checkpoint)
        self.keys: dict[int, str] = {}
        # Tied weights (T5's shared embedding) are one tensor under several names.
        named = [
            *wrapper.named_parameters(remove_duplicate=False),
            *wrapper.named_buffers(remove_duplicate=False),
        ]
        for name, tensor in named:
            key = name.removeprefix(WRAPPER_PREFIX)
            if key in self.index:
                self.keys.setdefault(id(tensor), key)

    @contextmanager
    def loaded(self, piece: Segment) -> Iterator[None]:
        import torch

        slots = []
        for owner in piece.module.modules():
            for kind in ("_parameters", "_buffers"):
                for attribute, tensor in getattr(owner, kind).items():
                    if tensor is not None and tensor.is_meta:
                        slots.append((owner, kind, attribute, tensor))
        values: dict[int, torch.Tensor] = {}
        try:
            for owner, kind, attribute, tensor in slots:
                if id(tensor) not in values:
                    values[id(tensor)] = self._read(piece, attribute, tensor)
                value = values[id(tensor)]
                getattr(owner, kind)[attribute] = (
                    torch.nn.Parameter(value, requires_grad=False)
                    if kind == "_parameters"
                    else value
                )
            values.clear()
            yield
        finally:
            for owner, kind, attribute, tensor in slots:
                getattr(owner, kind)[attribute] = tensor

    def _read(self, piece: Segment, attribute: str, tensor: torch.Tensor) -> torch.Tensor:
        from safetensors import safe_open

        key = self.keys.get(id(tensor))
        if key is None:
            raise ExportError(
                f"block {piece.name}: its weight '{attribute}' is not in the checkpoint, so it "
                "cannot be read one block at a time; build this component whole "
                "(--set build.by_block=never) on a machine with the memory for it"
            )
        path, name = self.index[key]
        with safe_open(str(path), framework="pt") as checkpoint:
            value = checkpoint.get_tensor(name)
        # fp32 like the whole build's module (bf16 / fp16 shards are cast one block at a time)
        return value.to(tensor.dtype) if value.is_floating_point() else value


def export(
    spec: ComponentSpec,
    component: ComponentPlan,
    options: RuntimeOptions,
    root: Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    progress: Progress,
) -> BlockBuild:
    """Write the component's IR under `root` block by block; see the module's docstring."""
    import openvino as ov
    import torch

    from modelkiln.runtimes.openvino import compile_config

    profile = component.profile
    assert spec.meta_module is not None
    wrapper = spec.meta_module()
    pieces = segments(wrapper, tuple(spec.outputs))
    if pieces is None:
        raise UnsupportedError(f"{spec.name} cannot be cut into blocks")
    weights = BlockWeights(wrapper, spec.checkpoint)
    dims, dynamic = export_dims(spec, profile)
    example = spec.dummy_inputs(dims, seed=profile.validation.seed)
    # Every feed is carried through the blocks; one of the export example's shapes traces the
    # conversion (the example itself, carried too, where no validation feed has them).
    shaped = [
        i
        for i, feed in enumerate(feeds)
        if all(feed[name].shape == value.shape for name, value in example.items())
    ]
    traced = [] if shaped else [example]
    trace = shaped[0] if shaped else 0
    chains = [
        {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feed.items()}
        for feed in [*traced, *feeds]
    ]
    checked = len(traced)  # the chains that are validation feeds start here
    last_use = _last_uses(pieces, spec)
    core = ov.Core()
    config = compile_config(options)
    made: list[tuple[Any, Segment]] = []
    scores: dict[str, OutputScore] = {}
    weight_types: dict[str, int] = {}
    nncf_options: dict[str, Any] = {}
    quantized = 0
    label = component.scheme.name if component.scheme is not None else "no scheme"
    with progress.task(
        f"building {spec.name} block by block ({label})", total=len(pieces)
    ) as advance:
        for position, piece in enumerate(pieces):
            with weights.loaded(piece), torch.no_grad():
                outputs = [_run(piece, chain) for chain in chains]
                model = _convert(piece, chains[trace], spec, dims, dynamic)
            last = position == len(pieces) - 1
            model, types, nncf_options = _compress(model, component, last=last)
            for kind, count in types.items():
                weight_types[kind] = weight_types.get(kind, 0) + count
                quantized += count
            compiled = core.compile_model(model, options.device.upper(), config)
            metrics = {name: OutputMetrics() for name in piece.outputs}
            for chain, expected in zip(chains[checked:], outputs[checked:], strict=True):
                actual = compiled([chain[name].numpy() for name in piece.inputs])
                for port, name in zip(compiled.outputs, piece.outputs, strict=True):
                    metrics[name].add(expected[name].numpy(), actual[port], is_logits=False)
            del compiled
            worst = min(metrics.values(), key=lambda m: m.min_cosine)
            if worst.non_finite:
                raise ValidationError(
                    f"{spec.name} block {piece.name} produced NaN or inf in OpenVINO where torch "
                    f"did not ({label}); keep it in fp32 with [components.{spec.name}] "
                    f'compute = "fp32"'
                )
            scores[piece.name] = OutputScore.of(worst)
            for chain, values in zip(chains, outputs, strict=True):
                chain.update(values)
                for name in [n for n in chain if last_use.get(n, len(pieces)) <= position]:
                    del chain[name]
            made.append((model, piece))
            del outputs
            release_memory()  # the block's fp32 copies, before the next block's
            advance(1)
    joined = _join(made, spec)
    del made
    directory = root / spec.path
    directory.mkdir(parents=True, exist_ok=True)
    entry = directory / MODEL_FILE
    ov.save_model(joined, str(entry), compress_to_fp16=profile.precision.weights == "fp16")
    del joined
    release_memory()  # the whole component, before the runtime loads it back for the check
    if spec.config_file is not None:
        (directory / "config.json").write_bytes(spec.config_file)
    expected_outputs = [
        {name: chain[name].numpy() for name in spec.outputs} for chain in chains[checked:]
    ]
    record = None
    if (scheme := component.scheme) is not None:
        assert isinstance(scheme, BY_BLOCK_SCHEMES)
        record = QuantizationRecord.of(
            scheme.name,
            {
                "nncf_mode": nncf_mode(scheme).lower(),
                **nncf_options,
                "quantized_weights": quantized,
                "weight_types": weight_types,
                "blocks": len(pieces),
                "bytes_before": sum(piece.weight_bytes() for piece in pieces),
                "bytes_after": entry.stat().st_size + entry.with_suffix(".bin").stat().st_size,
            },
        )
    return BlockBuild(entry, expected_outputs, scores, record)


def _last_uses(pieces: Sequence[Segment], spec: ComponentSpec) -> dict[str, int]:
    """The index of the last segment that reads each name (outputs of the component: never
    dropped)."""
    uses: dict[str, int] = {}
    for position, piece in enumerate(pieces):
        for name in piece.inputs:
            uses[name] = position
    for name in spec.outputs:
        uses[name] = len(pieces)
    return uses


def _run(piece: Segment, chain: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = piece.module(*[chain[name] for name in piece.inputs])
    return dict(zip(piece.outputs, out, strict=True))


def _convert(
    piece: Segment,
    example: Mapping[str, torch.Tensor],
    spec: ComponentSpec,
    dims: Mapping[str, int],
    dynamic: set[str],
) -> Any:
    """ov.convert_model of one block, weights copied (share_weights=False): the torch block
    is released as soon as this returns. Component inputs keep the profile's dynamic dims;
    activations between blocks are dynamic but for their last axis, and take their static
    sizes from the component's inputs once the blocks are joined."""
    import openvino as ov

    inputs = []
    for name in piece.inputs:
        value = example[name]
        if name in spec.inputs:
            declared = spec.inputs[name]
            sizes = declared.concrete_shape(dims)
            shape = [-1 if d in dynamic else s for d, s in zip(declared.shape, sizes, strict=True)]
        else:
            shape = [-1] * (value.ndim - 1) + [int(value.shape[-1])] if value.ndim else []
        element = ov.Type(np.dtype(str(value.dtype).removeprefix("torch.")))
        inputs.append((name, ov.PartialShape(shape), element))
    try:
        model = ov.convert_model(
            piece.module,
            example_input=tuple(example[name] for name in piece.inputs),
            input=inputs,
            share_weights=False,
        )
    except Exception as error:  # the converter raises many unrelated types
        raise ExportError(
            f"OpenVINO conversion of {spec.name} block {piece.name} failed: {first_line(error)}"
        ) from error
    for port, name in zip(model.outputs, piece.outputs, strict=True):
        port.get_tensor().set_names({name})
    return model


def _compress(
    model: Any, component: ComponentPlan, *, last: bool
) -> tuple[Any, dict[str, int], dict[str, Any]]:
    """The block with its weights compressed as the scheme says. Under 4-bit schemes nncf
    keeps a model's embeddings and last MatMul int8: blocks take its default only where they
    hold either (the component's last block, an embedding's), else all their layers 4-bit,
    so that the joined model's weights are what nncf makes of the whole."""
    scheme = component.scheme
    if scheme is None:
        return model, {}, {}
    assert isinstance(scheme, BY_BLOCK_SCHEMES)
    before = low_precision_constants(model)
    default = last or _has_embedding(model)
    compressed, options = compress_model(model, scheme, all_layers=None if default else True)
    after = low_precision_constants(compressed)
    return compressed, {kind: after[kind] - before.get(kind, 0) for kind in after}, options


def _has_embedding(model: Any) -> bool:
    """A Gather from a weight matrix (a token embedding), as nncf tells embeddings apart."""
    for op in model.get_ops():
        if op.get_type_name() != "Gather":
            continue
        source = op.input_value(0).get_node()
        while source.get_type_name() == "Convert":
            source = source.input_value(0).get_node()
        if source.get_type_name() == "Constant" and len(source.get_output_shape(0)) == 2:
            return True
    return False


def _join(made: Sequence[tuple[Any, Segment]], spec: ComponentSpec) -> Any:
    """One model from the blocks: every input a block takes from an earlier block is wired to
    that block's output; the component's inputs are one Parameter each, in its order."""
    import openvino as ov
    from openvino import opset13

    producers: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    for model, piece in made:
        # The converter names a Parameter after its input; its tensor has other names too.
        for parameter in model.get_parameters():
            name = parameter.get_friendly_name()
            if name in producers:
                for target in list(parameter.output(0).get_target_inputs()):
                    target.replace_source_output(producers[name])
            else:
                parameter.output(0).get_tensor().set_names({name})
                parameters[name] = parameter
                producers[name] = parameter.output(0)
        for result, name in zip(model.get_results(), piece.outputs, strict=True):
            # Each block named its outputs alike ("tokens"): only the component's keep one.
            port = result.input_value(0)
            port.get_tensor().set_names(set())
            producers[name] = port
    results = []
    for name in spec.outputs:
        producers[name].get_tensor().set_names({name})
        results.append(opset13.result(producers[name]))
    joined = ov.Model(results, [parameters[name] for name in spec.inputs], spec.name)
    joined.validate_nodes_and_infer_types()
    return joined


__all__ = ["BlockBuild", "BlockWeights", "choose", "cut", "export", "needed_bytes", "refusal"]
