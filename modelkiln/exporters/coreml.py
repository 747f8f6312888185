"""torch -> Core ML ML Program (`model.mlpackage`) with coremltools' torch.export frontend.

Why torch.export and not torch.jit.trace: coremltools 9's TorchScript frontend fails beside
numpy 2.4 on every component we export (a scalar cast of a 1-element array inside its op
converters); its ExportedProgram frontend converts them all, given two mends done here:
- graphs keep `aten.alias` nodes (transformers' CLIP attention) that coremltools has no
  converter for: an alias is its input, so its uses are rewired to the input;
- a 0-d input (the UNet timestep) is refused ("Rank-0 ... is unsupported"): the program takes
  shape (1,) and the session reshapes the 0-d feed; diffusers broadcasts either.
Core ML has no int64 tensors: integer inputs (token ids) become int32.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from modelkiln.errors import ExportError, first_line
from modelkiln.exporters.base import (
    DYNAMIC_EXAMPLE_SIZE,
    Exporter,
    dim_ranges,
    export_dims,
    per_input_shapes,
    write_config,
)
from modelkiln.quiet import printing_into
from modelkiln.runtimes.coreml import CoreMLSettings, import_coremltools

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
    from modelkiln.specs import ComponentSpec, TensorSpec

logger = logging.getLogger(__name__)

MODEL_FILE = "model.mlpackage"
# Core ML's integer tensors are int32; float tensors keep their type (fp32 in, fp32 out).
COREML_DTYPES = {"int64": np.int32, "int32": np.int32, "float32": np.float32}
# Resolution dims vary in steps of these: SD's UNet halves its latent three times, its VAE
# encoder the pixels three times.
STRIDES = {"latent_height": 8, "latent_width": 8, "height": 8, "width": 8}


def coreml_shape(tensor: TensorSpec) -> tuple[int | str, ...]:
    """The shape the program takes: a 0-d input becomes (1,)."""
    return tensor.shape if tensor.shape else (1,)


def dim_bounds(spec: ComponentSpec, profile: Profile) -> dict[str, tuple[int, int, int]]:
    """(lower, default, upper) of every dim the program keeps flexible: dim_ranges with the
    resolution bounds moved onto each dim's stride; a dim left with one size stays fixed."""
    bounds = {}
    for name, (low, size, high) in dim_ranges(spec, profile).items():
        stride = STRIDES.get(name, 1)
        low, high = min(-(-low // stride) * stride, size), max(high // stride * stride, size)
        if low < high:
            bounds[name] = (low, size, high)
    return bounds


def enumerated_sizes(bounds: tuple[int, int, int], stride: int) -> list[int]:
    """The sizes an enumerated dim takes: its bounds, its default, and the powers of two times
    the stride between them (batch 1..16: 1, 2, 4, 8, 16)."""
    low, default, high = bounds
    sizes = {low, default, high}
    size = stride
    while size < high:
        if size > low:
            sizes.add(size)
        size *= 2
    return sorted(sizes)


def remove_aliases(program: Any) -> int:
    """Rewire every `aten.alias` node's uses to its input and erase it; returns how many."""
    import torch

    graph = program.graph_module.graph
    aliases = [
        node
        for node in graph.nodes
        if node.op == "call_function" and node.target is torch.ops.aten.alias.default
    ]
    for node in aliases:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    if aliases:
        program.graph_module.recompile()
    return len(aliases)


def exported_program(spec: ComponentSpec, module: Any, profile: Profile) -> Any:
    """torch.export of the wrapper with the flexible dims symbolic, decomposed to core aten."""
    import torch

    dims, _ = export_dims(spec, profile)
    bounds = dim_bounds(spec, profile)
    example = spec.dummy_inputs(dims, seed=profile.validation.seed)
    args = tuple(torch.from_numpy(np.atleast_1d(example[name])) for name in spec.inputs)
    # A resolution dim is exported as a multiple of its stride: SD's UNet halves the latent
    # three times, and torch.export refuses a free dim that the graph constrains to that.
    symbols = {
        name: STRIDES[name]
        * torch.export.Dim(f"{name}_units", min=low // STRIDES[name], max=high // STRIDES[name])
        if name in STRIDES
        else torch.export.Dim(name, min=low, max=high)
        for name, (low, _, high) in bounds.items()
    }
    # An example batch of 1 would specialise the dim; export_dims gives DYNAMIC_EXAMPLE_SIZE.
    assert "batch" not in bounds or dims["batch"] == DYNAMIC_EXAMPLE_SIZE
    with torch.no_grad():
        program = torch.export.export(
            module,
            args,
            dynamic_shapes=per_input_shapes(spec, symbols) if symbols else None,
            strict=False,
        ).run_decompositions(_decompositions())
    remove_aliases(program)
    return program


def _decompositions() -> dict[Any, Any]:
    """Only what coremltools 9 lacks: where() with a Python scalar branch (T5's attention
    masking) becomes where() of two tensors."""
    import torch

    aten = torch.ops.aten

    def where_scalar_other(condition: Any, tensor: Any, other: float) -> Any:
        return aten.where.self(condition, tensor, aten.full_like(tensor, other))

    def where_scalar_self(condition: Any, value: float, tensor: Any) -> Any:
        return aten.where.self(condition, aten.full_like(tensor, value), tensor)

    return {aten.where.ScalarOther: where_scalar_other, aten.where.ScalarSelf: where_scalar_self}


def convert(spec: ComponentSpec, module: Any, profile: Profile) -> Any:
    """The component as an in-memory coremltools MLModel (not loaded for prediction)."""
    ct = import_coremltools()

    program = exported_program(spec, module, profile)
    bounds = dim_bounds(spec, profile)
    flexible = [name for name, t in spec.inputs.items() if set(t.symbolic_dims) & set(bounds)]
    settings = CoreMLSettings.of(profile)
    enumerated = settings.flexible_shapes == "enumerated"
    if enumerated and len(flexible) > 1:
        raise ExportError(
            f"{spec.name}: Core ML enumerates the shapes of one input, and {', '.join(flexible)} "
            "are all flexible; set coreml.flexible_shapes = 'range'"
        )
    dims, _ = export_dims(spec, profile)
    inputs = []
    for name, tensor in spec.inputs.items():
        example = tensor.concrete_shape(dims) if tensor.shape else (1,)
        shape: Any
        if name in flexible and enumerated:
            choices = [
                enumerated_sizes(bounds[d], STRIDES.get(d, 1)) if d in bounds else [n]
                for d, n in zip(tensor.shape, example, strict=True)
            ]
            default = tuple(
                bounds[d][1] if d in bounds else n
                for d, n in zip(tensor.shape, example, strict=True)
            )
            shape = ct.EnumeratedShapes(
                shapes=[list(c) for c in itertools.product(*choices)], default=default
            )
        else:
            shape = [
                ct.RangeDim(
                    lower_bound=bounds[d][0], upper_bound=bounds[d][2], default=bounds[d][1]
                )
                if d in bounds
                else size
                for d, size in zip(coreml_shape(tensor), example, strict=True)
            ]
        inputs.append(ct.TensorType(name=name, shape=shape, dtype=COREML_DTYPES[tensor.dtype]))
    precision = (
        ct.precision.FLOAT16 if profile.precision.weights == "fp16" else ct.precision.FLOAT32
    )
    return ct.convert(
        program,
        inputs=inputs,
        outputs=[ct.TensorType(name=name) for name in spec.outputs],
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, settings.target),
        compute_precision=precision,
        skip_model_load=True,
    )


class CoreMLExporter(Exporter):
    format = "coreml"
    backend = "coreml"
    extra = "coreml-build"
    # The program computes in the precision it stores (compute_precision at conversion).
    weight_precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16"})
    packages = ("torch", "coremltools")

    def export(
        self, spec: ComponentSpec, load_module: Callable[[], Any], profile: Profile, root: Path
    ) -> Path:
        out_dir = self.directory(spec, root)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / MODEL_FILE
        captured = io.StringIO()
        try:
            # coremltools reports its passes with tqdm bars on stderr; the library never prints.
            with printing_into(captured, stderr=True):
                model = convert(spec, load_module(), profile)
                model.short_description = f"{spec.name}, exported by modelkiln"
                model.user_defined_metadata["modelkiln.component"] = spec.name
                # What compression may use depends on it (quantize/coreml.py reads it back).
                target = CoreMLSettings.of(profile).target
                model.user_defined_metadata["modelkiln.target"] = target
                model.save(str(path))
        except Exception as error:  # torch.export and coremltools raise many unrelated types
            logger.debug("coremltools output:\n%s", captured.getvalue())
            raise ExportError(
                f"Core ML conversion of {spec.name} failed: {first_line(error)} "
                "(run with -v for details)"
            ) from error
        write_config(spec, out_dir)
        return path
