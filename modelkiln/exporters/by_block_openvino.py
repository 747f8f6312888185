"""A component larger than memory, built one block at a time to OpenVINO IR.

For each block in turn (exporters/by_block.py cuts the component and reads the weights): its
weights are read from the checkpoint shards into the meta-device model (fp32, one block:
~0.9 GB for SD 3.5 Large), it runs in torch on the activations the blocks before it produced,
is converted to OpenVINO (a copy, so the torch weights go right after), its weights
compressed (int8 / int4 / nf4 with nncf) and the compressed block run on the same inputs:
its score against torch goes to the manifest (validation.by_block) and names the block where
the error entered if the whole check fails; NaN or inf stops the build there. The compressed
block also runs on what the compressed blocks before it made: carried to the last block, that
chain is the whole component's output, its error compounded as the saved model compounds it,
computed one block at a time. The IR blocks are then joined into one model, each block's
inputs wired to the outputs that made them, and saved.

Held at the peak: the compressed blocks made so far, plus one block in fp32 about three times
(torch, its IR copy, the compressed IR being made).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln.env import release_memory, resident_bytes
from modelkiln.errors import ExportError, ValidationError, first_line
from modelkiln.evaluation.metrics import OutputMetrics
from modelkiln.exporters.base import export_dims, write_config
from modelkiln.exporters.block_run import (
    OPENVINO_FOUR_BIT_COPIES,
    WHOLE_CHECK_COPIES,
    BlockBuild,
    drop_used,
    last_uses,
    open_blocks,
    torch_feeds,
)
from modelkiln.exporters.openvino import MODEL_FILE
from modelkiln.progress import Progress
from modelkiln.quantize.openvino import compress_model, low_precision_constants, nncf_mode
from modelkiln.quantize.schemes import Int4Weights, Int8Weights, NF4Weights
from modelkiln.records import OutputScore, QuantizationRecord

if TYPE_CHECKING:
    import torch

    from modelkiln.models.blocks import Segment
    from modelkiln.plan import ComponentPlan
    from modelkiln.runtimes.base import RuntimeOptions
    from modelkiln.specs import ComponentSpec

logger = logging.getLogger(__name__)

BY_BLOCK_SCHEMES = (Int8Weights, Int4Weights, NF4Weights)


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

    from modelkiln.runtimes.openvino import compile_config, compiled_info

    profile = component.profile
    pieces, weights = open_blocks(spec)
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
    chains = torch_feeds([*traced, *feeds])
    checked = len(traced)  # the chains that are validation feeds start here
    # The validation feeds carried through the compressed blocks instead of torch's.
    carried: list[dict[str, np.ndarray]] = [dict(feed) for feed in feeds]
    last_use = last_uses(pieces, spec)
    core = ov.Core()
    config = compile_config(options)
    runtime: dict[str, Any] = {}
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
                outputs = [piece.run(chain) for chain in chains]
                model = _convert(piece, chains[trace], spec, dims, dynamic)
            last = position == len(pieces) - 1
            model, types, nncf_options = _compress(model, component, last=last)
            for kind, count in types.items():
                weight_types[kind] = weight_types.get(kind, 0) + count
                quantized += count
            compiled = core.compile_model(model, options.device.upper(), config)
            runtime = compiled_info(compiled, options.device.upper())
            metrics = {name: OutputMetrics() for name in piece.outputs}
            for chain, expected in zip(chains[checked:], outputs[checked:], strict=True):
                arrays = {name: chain[name].numpy() for name in piece.inputs}
                for name, actual in _run_compiled(compiled, piece, arrays).items():
                    metrics[name].add(expected[name].numpy(), actual, is_logits=False)
            for arrays in carried:
                arrays.update(_run_compiled(compiled, piece, arrays))
                drop_used(arrays, last_use, position)
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
                drop_used(chain, last_use, position)
            made.append((model, piece))
            del outputs
            release_memory()  # the block's fp32 copies, before the next block's
            logger.info(
                "%s block %s: %.2f GB resident", spec.name, piece.name, resident_bytes() / 1e9
            )
            advance(1)
    joined = _join(made, spec)
    del made
    directory = root / spec.path
    directory.mkdir(parents=True, exist_ok=True)
    entry = directory / MODEL_FILE
    ov.save_model(joined, str(entry), compress_to_fp16=profile.precision.weights == "fp16")
    del joined
    release_memory()  # the whole component, before the runtime loads it back for the check
    write_config(spec, directory)
    expected_outputs = [
        {name: chain[name].numpy() for name in spec.outputs} for chain in chains[checked:]
    ]
    chained = {name: OutputMetrics() for name in spec.outputs}
    for reference, arrays in zip(expected_outputs, carried, strict=True):
        for name, output in spec.outputs.items():
            chained[name].add(reference[name], arrays[name], is_logits=output.is_logits)
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
    four_bit = isinstance(component.scheme, Int4Weights | NF4Weights)
    copies = OPENVINO_FOUR_BIT_COPIES if four_bit else WHOLE_CHECK_COPIES
    return BlockBuild(entry, expected_outputs, record, scores, chained, copies, runtime)


def _run_compiled(
    compiled: Any, piece: Segment, values: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The compiled block's outputs, by name, on the `values` of the names it takes."""
    actual = compiled([values[name] for name in piece.inputs])
    return {
        name: np.array(actual[port])
        for port, name in zip(compiled.outputs, piece.outputs, strict=True)
    }


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


__all__ = ["BY_BLOCK_SCHEMES", "export"]
