"""torch -> ONNX with torch's dynamo-based exporter, saved with onnx_ir.

Two paths, the same graph (bit-identical files on an SD-1.5 UNet, see bench/export_memory.py):
- streaming, for components with a meta-device twin and a safetensors checkpoint: the graph is
  exported from weightless meta tensors and each weight is read from the checkpoint only while
  it is written, so peak memory stays near the graph, not the weights (SD-1.5 UNet: 2.1 GB
  instead of 4.5 GB for 3.4 GB of weights);
- in memory, from the loaded module, for everything else.
External weights go to one `model.onnx_data` beside `model.onnx` (optimum's convention).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.errors import ExportError, first_line
from modelkiln.exporters.base import Exporter, export_dims, export_signature, write_config
from modelkiln.exporters.onnx_fusions import fuse_for_onnxruntime, fusions_wanted
from modelkiln.quiet import printing_into
from modelkiln.runtimes.onnxruntime import FUSED_OPS_KEY

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
    from modelkiln.quantize.schemes import Int4Weights
    from modelkiln.specs import ComponentSpec

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
# Protobuf cannot serialise a message over 2 GiB; stay clear of it.
INLINE_LIMIT_BYTES = 1_800_000_000
# The wrappers keep the source model as `self.model`: its weights are "model." + checkpoint key.
WRAPPER_PREFIX = "model."


def onnx_from_torch(
    spec: ComponentSpec, load_module: Callable[[], Any], profile: Profile, path: Path
) -> Path:
    """Export the component to `path`; weights go to `<stem>.onnx_data` when large or asked."""
    program = _streamed_program(spec, profile)
    if program is None:
        program = _export(spec, load_module(), profile, meta=False)
        _fold_weight_transposes(program.model)
        program.optimize()
    # The fusions read q/k/v projections as constant weights plus a bias: a run-time LoRA's
    # addition (optional inputs) would be fused as a bias of the wrong shape.
    run_time_inputs = any(tensor.optional for tensor in spec.inputs.values())
    level = fusions_wanted(profile)
    if level is not None and not run_time_inputs:
        fused = fuse_for_onnxruntime(program.model, level)
        program.model.metadata_props[FUSED_OPS_KEY] = json.dumps(fused)
    _save(program, spec, profile, path)
    return path


def onnx_streamed_int4(
    spec: ComponentSpec, profile: Profile, settings: Int4Weights, path: Path
) -> dict[str, Any]:
    """Export the component streamed from its checkpoint with int4 weights (MatMulNBits)
    quantized as the file is written: neither the fp32 weights nor the int4 model are ever
    whole in memory. Returns the quantization's record."""
    from modelkiln.quantize.onnx import ACCURACY_LEVEL
    from modelkiln.quantize.onnx_streamed import quantize_matmuls_as_written

    program = _streamed_program(spec, profile)
    if program is None:
        raise ExportError(
            f"{spec.name} cannot be exported streamed from its checkpoint (-v says why), so its "
            "int4 weights cannot be quantized as they are written; build it whole on a machine "
            "with the memory for it (--set build.by_block=never)"
        )
    record = quantize_matmuls_as_written(program.model, settings, ACCURACY_LEVEL)
    _save(program, spec, profile, path)
    return record


def _save(program: Any, spec: ComponentSpec, profile: Profile, path: Path) -> None:
    """Our dim names and metadata, then the file (weights external when large or asked)."""
    import onnx_ir

    weight_bytes = sum(
        int(value.const_value.nbytes)
        for value in program.model.graph.initializers.values()
        if value.const_value is not None
    )
    mode = profile.export.external_data
    external = mode == "always" or (mode == "auto" and weight_bytes > INLINE_LIMIT_BYTES)
    if mode == "never" and weight_bytes > INLINE_LIMIT_BYTES:
        raise ExportError(
            f"{spec.name} has {weight_bytes / 1e9:.1f} GB of weights, over ONNX's 2 GB inline "
            "limit; set export.external_data = 'auto'"
        )
    _name_dims(program.model, spec, profile)
    _default_optional_inputs(program.model, spec)
    _strip_debug_metadata(program.model)
    program.model.metadata_props["modelkiln.component"] = spec.name
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx_ir.save(program.model, path, external_data=f"{path.stem}.onnx_data")
    else:
        onnx_ir.save(program.model, path)


def _streamed_program(spec: ComponentSpec, profile: Profile) -> Any | None:
    """The meta-device export with every weight bound to its checkpoint, or None if it can't."""
    if spec.meta_module is None or not spec.checkpoint:
        return None
    module = spec.meta_module()
    index = checkpoint_index(spec.checkpoint)
    keys = checkpoint_keys(module, index)
    # A tensor the checkpoint lacks (CLIP's position_ids buffer) has no value to stream: known
    # before the export, which would be made twice otherwise.
    unsaved = [name for name, _ in module.named_buffers() if name not in keys]
    if unsaved:
        _log_missing(spec, unsaved)
        return None
    try:
        program = _export(spec, module, profile, meta=True)
    except ExportError as error:
        logger.info("%s: no meta-device export (%s); exporting from memory", spec.name, error)
        return None
    initializers = program.model.graph.initializers
    missing = [n for n in initializers if n not in keys]
    if missing:
        _log_missing(spec, missing)
        return None
    import onnx_ir

    for name, value in initializers.items():
        declared = value.const_value
        value.const_value = onnx_ir.LazyTensor(
            partial(_read_tensor, index[keys[name]], name, declared.dtype),
            dtype=declared.dtype,
            shape=declared.shape,
            name=name,
        )
    transposed = _fold_weight_transposes(program.model)
    logger.debug("%s: %d weight transposes folded lazily", spec.name, transposed)
    # Constant folding needs real values, so the optimizer runs once the weights are bound.
    program.optimize()
    return program


def _log_missing(spec: ComponentSpec, missing: list[str]) -> None:
    logger.info(
        "%s: %d weights are not in the checkpoint (%s, ...); exporting from memory",
        spec.name,
        len(missing),
        missing[0],
    )


def _fold_weight_transposes(model: Any) -> int:
    """Fold Transpose(weight) into the weight itself, computed only when the model is saved.

    The exporter writes a Linear as MatMul(x, Transpose(W)). onnxscript's optimizer folds such
    Transposes whatever their size (`_DEFAULT_ALWAYS_FOLD_OPS`), reading each weight and keeping
    its transpose in memory: +0.5 GB per block of SD3.5 Large, the whole transformer by the
    end of a streamed export. Folded here, a transposed weight is a LazyTensor (read,
    transposed and written one at a time) under the weight's own name, and the graph is the
    one the optimizer would have made. Both export paths fold so, and write the same model.
    """
    import onnx_ir

    count = 0
    for node in list(model.graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.inputs[0]
        if (
            weight is None
            or not weight.is_initializer()
            or weight.const_value is None
            or len(weight.uses()) != 1
            or weight in model.graph.outputs
            or node.outputs[0] in model.graph.outputs
        ):
            continue
        lazy = weight.const_value
        attribute = node.attributes.get("perm")
        rank = len(lazy.shape)
        perm = tuple(attribute.as_ints()) if attribute is not None else tuple(reversed(range(rank)))
        shape = onnx_ir.Shape([lazy.shape[axis] for axis in perm])
        weight.const_value = onnx_ir.LazyTensor(
            partial(_transposed, lazy, perm), dtype=lazy.dtype, shape=shape, name=weight.name
        )
        weight.shape = shape
        node.outputs[0].replace_all_uses_with(weight)
        model.graph.remove(node, safe=True)
        count += 1
    return count


def _transposed(tensor: Any, perm: tuple[int, ...]) -> Any:
    import numpy as np
    import onnx_ir

    return onnx_ir.Tensor(np.ascontiguousarray(tensor.numpy().transpose(perm)), name=tensor.name)


def _as_signature(module: Any, per_input: list[dict[int, Any]]) -> tuple[Any, ...]:
    """Each positional input's dynamic axes in the structure torch.export binds them to the
    forward's signature: inputs past its named parameters are one tuple (*residuals)."""
    import inspect

    parameters = inspect.signature(module.forward).parameters.values()
    named = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return (*per_input[: len(named)], tuple(per_input[len(named) :]))
    return tuple(per_input)


def _export(spec: ComponentSpec, module: Any, profile: Profile, *, meta: bool) -> Any:
    import torch

    dims, dynamic = export_dims(spec, profile)
    example = spec.dummy_inputs(dims, seed=profile.validation.seed)
    args = tuple(torch.from_numpy(example[name]) for name in spec.inputs)
    if meta:
        args = tuple(arg.to("meta") for arg in args)
    axes = {d: torch.export.Dim(d, min=1) for d in sorted(dynamic)}
    per_input = [
        {i: axes[d] for i, d in enumerate(tensor.shape) if isinstance(d, str) and d in axes}
        for tensor in spec.inputs.values()
    ]
    dynamic_shapes = _as_signature(module, per_input)
    captured = io.StringIO()
    try:
        # The exporter reports its stages on stdout; the library never prints.
        with printing_into(captured):
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_shapes=dynamic_shapes if axes else None,
                opset_version=profile.export.opset,
                verbose=False,
                optimize=False,
            )
    except Exception as error:  # torch.export raises many unrelated types
        logger.debug("torch.onnx output:\n%s", captured.getvalue())
        raise ExportError(
            f"ONNX export of {spec.name} failed: {first_line(error)} (run with -v for details)"
        ) from error
    logger.debug("torch.onnx output:\n%s", captured.getvalue())
    if program is None:  # only the legacy exporter returns None
        raise ExportError(f"ONNX export of {spec.name} returned no program")
    return program


def checkpoint_index(files: tuple[Path, ...]) -> dict[str, tuple[Path, str]]:
    """Checkpoint key -> (file, key) over every shard, reading headers only."""
    from safetensors import safe_open

    index = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as checkpoint:
            index.update({key: (path, key) for key in checkpoint.keys()})  # noqa: SIM118
    return index


def checkpoint_keys(module: Any, index: Mapping[str, Any]) -> dict[str, str]:
    """The wrapper's parameter and buffer names -> their checkpoint keys. A tied weight (T5's
    shared embedding) is saved under one of its names: every name maps to that key."""
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    saved: dict[int, str] = {}
    for name, tensor in named:
        key = name.removeprefix(WRAPPER_PREFIX)
        if key in index:
            saved.setdefault(id(tensor), key)
    return {name: saved[id(tensor)] for name, tensor in named if id(tensor) in saved}


def _read_tensor(location: tuple[Path, str], name: str, dtype: Any) -> Any:
    """One weight, read when the saver reaches it (and cast, e.g. from an fp16 checkpoint)."""
    import onnx_ir
    from safetensors import safe_open

    path, key = location
    with safe_open(str(path), framework="numpy") as checkpoint:
        array = checkpoint.get_tensor(key)
    return onnx_ir.Tensor(array.astype(dtype.numpy(), copy=False), name=name)


def _name_dims(model: Any, spec: ComponentSpec, profile: Profile) -> None:
    """Declare our dim names on the graph's inputs and outputs.

    optimum's IO binding computes output shapes by evaluating output dim names as expressions
    of input dim names ("latent_height * 8"), which the exporter's own names ("8*s0") are not.
    """
    import onnx_ir

    inputs, outputs = export_signature(spec, profile)
    for values, specs in ((model.graph.inputs, inputs), (model.graph.outputs, outputs)):
        for value in values:
            tensor = specs.get(value.name)
            if tensor is not None and value.shape is not None:
                value.shape = onnx_ir.Shape(list(tensor.shape))


def _default_optional_inputs(model: Any, spec: ComponentSpec) -> None:
    """An optional input's default is an initializer of its name: ONNX Runtime then runs
    the graph without it, and a feed or a LoRA adapter overrides it."""
    import onnx_ir

    for value in model.graph.inputs:
        tensor = spec.inputs.get(value.name)
        if tensor is not None and tensor.optional:
            value.const_value = onnx_ir.Tensor(tensor.default(), name=value.name)
            model.graph.register_initializer(value)


def _strip_debug_metadata(model: Any) -> None:
    """Drop the exporter's per-node stack traces and FX dumps (40 % of a small ViT's file)."""
    import onnx_ir

    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
    for value in [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()


class OnnxExporter(Exporter):
    format = "onnx"
    backend = "onnxruntime"
    extra = "onnx"
    weight_precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16"})
    packages = ("torch", "onnx", "onnxscript", "onnx_ir")

    def export(
        self, spec: ComponentSpec, load_module: Callable[[], Any], profile: Profile, root: Path
    ) -> Path:
        directory = self.directory(spec, root)
        path = onnx_from_torch(spec, load_module, profile, directory / MODEL_FILE)
        if profile.precision.weights == "fp16":
            from modelkiln.quantize.onnx import to_fp16

            to_fp16(path)  # fp32 inputs and outputs stay: callers feed what they always fed
        write_config(spec, directory)
        return path
