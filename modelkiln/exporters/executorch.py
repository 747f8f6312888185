"""torch -> ExecuTorch program (`model.pte`): torch.export, then
`executorch.exir.to_edge_transform_and_lower` with the partitioner of `[executorch]
partitioner`, then `to_executorch()`.

- xnnpack (default): XnnpackPartitioner; what XNNPACK does not take stays on the portable
  kernels, so with `rewrite_for_xnnpack` the norms and attention are exported as ops it takes
  (exporters/xnnpack_rewrites.py).
- coreml: executorch.backends.apple's CoreMLPartitioner (coremltools converts the partitions
  here; running needs a runtime built with the Core ML delegate).
- vulkan: VulkanPartitioner (running needs a Vulkan build of the runtime).
- portable: no partitioner, every op on the portable kernels (slow; a reference).
A dynamic batch is a `torch.export.Dim` bounded by `shapes.max_batch_size` (ExecuTorch plans
memory for the bound). Beside the program, `delegation.json` says how much of the graph the
delegate took and which ops it left on the portable kernels; the session reports it.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from modelkiln.errors import ExportError, first_line
from modelkiln.exporters.base import (
    Exporter,
    dim_ranges,
    export_dims,
    per_input_shapes,
    write_config,
)
from modelkiln.quiet import printing_into
from modelkiln.runtimes.executorch import DELEGATION_FILE, MODEL_FILE, ExecuTorchSettings

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
    from modelkiln.specs import ComponentSpec

logger = logging.getLogger(__name__)

# The op namespaces of quantized graphs: PT2E's quantize / dequantize pairs, torchao's
# quantize_affine / choose_qparams.
QUANTIZED_OPS = ("quantized_decomposed", "torchao")
# torchao's dequantize_affine of int4 weights (8da4w): int8 storage, quant range [-8, 7].
INT4_RANGE = (-8, 7)


def exported_program(spec: ComponentSpec, module: Any, profile: Profile) -> Any:
    """torch.export of the component's wrapper; the batch symbolic (1..max_batch_size) when
    the profile's batch is dynamic; its norms and attention in ops XNNPACK takes when the
    profile rewrites for it."""
    import torch

    dims, dynamic = export_dims(spec, profile)
    example = spec.dummy_inputs(dims, seed=profile.validation.seed)
    # np.require keeps a 0-d input 0-d (the UNet's timestep): ascontiguousarray makes it (1,),
    # and the program would then take a shape other than the one kiln.json records.
    args = tuple(
        torch.from_numpy(np.require(example[name], requirements="C")) for name in spec.inputs
    )
    ranges = dim_ranges(spec, profile)
    symbols = {
        name: torch.export.Dim(name, min=low, max=high)
        for name, (low, _, high) in ranges.items()
        if name in dynamic
    }
    shapes = per_input_shapes(spec, symbols) if symbols else None
    with torch.no_grad(), _rewritten(module, profile):
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)


def _rewritten(module: Any, profile: Profile) -> AbstractContextManager[Any]:
    """The module as the export traces it: rewritten for XNNPACK when the profile asks."""
    from modelkiln.exporters.xnnpack_rewrites import delegable

    settings = ExecuTorchSettings.of(profile)
    rewrite = settings.partitioner == "xnnpack" and settings.rewrite_for_xnnpack
    return delegable(module) if rewrite else nullcontext(module)


def partitioners(name: str) -> list[Any]:
    """to_edge_transform_and_lower's partitioner list for our partitioner name."""
    if name == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]
    if name == "coreml":
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        return [CoreMLPartitioner()]
    if name == "vulkan":
        from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner

        return [VulkanPartitioner()]
    return []  # portable


def symbolic_axes(program: Any) -> set[str]:
    """The user inputs' symbolic axes in an ExportedProgram, as "input[axis]". Read before
    the lowering and after it: a pass that guards on a dynamic size pins it (in the shared
    shape environment, so the program given to the lowering changes too)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    names = set(program.graph_signature.user_inputs)
    return {
        f"{node.name}[{axis}]"
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in names and "val" in node.meta
        for axis, dim in enumerate(node.meta["val"].shape)
        if not is_concrete_int(dim)
    }


def inference_precision(program: Any) -> str:
    """f32; int8 where a before-export scheme put quantize / dequantize pairs in the graph;
    "int8, int4 weights" where torchao dequantizes weights from the int4 range (int4-weights:
    XNNPACK's int8 x int4 kernels)."""
    calls = [(str(n.target), n.args) for n in program.graph.nodes if n.op == "call_function"]
    if not any(namespace in target for target, _ in calls for namespace in QUANTIZED_OPS):
        return "f32"
    # dequantize_affine(input, block_size, scale, zero_point, input_dtype, quant_min, quant_max)
    int4 = any("dequantize_affine" in t and tuple(a[5:7]) == INT4_RANGE for t, a in calls)
    return "int8, int4 weights" if int4 else "int8"


def constant_folding() -> Any:
    """An edge-program pass: every op whose inputs are all weights (a GEGLU projection's
    halves, models/geglu_split.py; a norm's reshaped scale) computed once, at export, into a
    weight of its own. XNNPACK delegates a matmul only when its weight is one: the SD UNet's
    GEGLU halves ran as portable addmm, between partitions, without it. exir's
    constant_prop_pass leaves quantize / dequantize ops alone (XNNPACK matches those), and in
    the edge dialect a slice is a copy, so each folded half owns its values."""
    from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    class FoldConstants(ExportedProgramPassBase):
        def call(self, exported_program: Any) -> Any:
            return ExportedProgramPassResult(constant_prop_pass(exported_program), True)

    return FoldConstants()


def lower(program: Any, partitioner: str) -> tuple[bytes, dict[str, Any]]:
    """The .pte bytes of an ExportedProgram lowered to `partitioner`, and what it delegated."""
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    precision = inference_precision(program)
    # exir's IR verifier re-runs the graph and takes len() of the first tensor an op returns
    # in a list (the UNet's GEGLU chunk), which pins a symbolic batch to the example's size:
    # a program with a symbolic dim skips it (the build validates the program against torch).
    config = EdgeCompileConfig(_check_ir_validity=not program.range_constraints)
    dynamic = symbolic_axes(program)
    edge = to_edge_transform_and_lower(
        program,
        transform_passes=[constant_folding()],
        partitioner=partitioners(partitioner),
        compile_config=config,
    )
    pinned = sorted(dynamic - symbolic_axes(edge.exported_program()))
    if pinned:
        raise ExportError(
            f"the lowering fixed the dynamic {', '.join(pinned)} to the example's size; "
            "set shapes.dynamic_batch = false (a fixed batch of shapes.batch_size)"
        )
    info = get_delegation_info(edge.exported_program().graph_module)
    portable = {
        op: breakdown.non_delegated
        for op, breakdown in sorted(info.delegation_by_operator.items())
        if breakdown.non_delegated
    }
    delegation = {
        "partitioner": partitioner,
        "inference_precision": precision,
        "delegated_subgraphs": info.num_delegated_subgraphs,
        "delegated_nodes": info.num_delegated_nodes,
        "portable_nodes": info.num_non_delegated_nodes,
        "portable_ops": portable,
    }
    return edge.to_executorch().buffer, delegation


class ExecuTorchExporter(Exporter):
    format = "executorch"
    backend = "executorch"
    extra = "executorch"
    # fp32 programs (a before-export scheme makes the int8 ones).
    weight_precisions: ClassVar[frozenset[str]] = frozenset({"fp32"})
    packages = ("torch", "executorch")

    def traced_as(self, module: Any, profile: Profile) -> AbstractContextManager[Any]:
        """PT2E's capture (int8-static) sees the rewritten norms and attention, as the
        export does: its quantize/dequantize pairs then sit around the ops XNNPACK lowers."""
        return _rewritten(module, profile)

    def export(
        self, spec: ComponentSpec, load_module: Callable[[], Any], profile: Profile, root: Path
    ) -> Path:
        out_dir = self.directory(spec, root)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / MODEL_FILE
        partitioner = ExecuTorchSettings.of(profile).partitioner
        captured = io.StringIO()
        try:
            # coremltools draws progress bars on stderr; the library never prints.
            with printing_into(captured, stderr=True):
                program = exported_program(spec, load_module(), profile)
                buffer, delegation = lower(program, partitioner)
        except Exception as error:  # torch.export and exir raise many unrelated types
            logger.debug("executorch output:\n%s", captured.getvalue())
            raise ExportError(
                f"ExecuTorch lowering of {spec.name} to {partitioner} failed: "
                f"{first_line(error)} (run with -v for details)"
            ) from error
        path.write_bytes(buffer)
        text = json.dumps(delegation, indent=2) + "\n"
        (out_dir / DELEGATION_FILE).write_text(text, encoding="utf-8")
        logger.info(
            "%s: %d node(s) in %d %s subgraph(s), %d on portable kernels",
            spec.name,
            delegation["delegated_nodes"],
            delegation["delegated_subgraphs"],
            partitioner,
            delegation["portable_nodes"],
        )
        write_config(spec, out_dir)
        return path
