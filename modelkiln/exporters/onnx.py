"""torch -> ONNX with torch's dynamo-based exporter, saved with onnx_ir.

The dynamo exporter keeps peak memory near the weight size and onnx_ir writes all external
weights into one `model.onnx_data` beside `model.onnx` (optimum's convention) instead of one
file per tensor.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.errors import ExportError
from modelkiln.exporters.base import Exporter, export_dims, first_line

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
    from modelkiln.specs import ComponentSpec

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
# Protobuf cannot serialise a message over 2 GiB; stay clear of it.
INLINE_LIMIT_BYTES = 1_800_000_000


def onnx_from_torch(spec: ComponentSpec, module: Any, profile: Profile, path: Path) -> Path:
    """Export spec's module to `path`; weights go to `<stem>.onnx_data` when large or asked."""
    import onnx_ir
    import torch

    dims, dynamic = export_dims(spec, profile)
    example = spec.dummy_inputs(dims, seed=profile.validation.seed)
    args = tuple(torch.from_numpy(example[name]) for name in spec.inputs)
    axes = {d: torch.export.Dim(d, min=1) for d in sorted(dynamic)}
    dynamic_shapes = {
        name: {i: axes[d] for i, d in enumerate(tensor.shape) if isinstance(d, str) and d in axes}
        for name, tensor in spec.inputs.items()
    }
    captured = io.StringIO()
    try:
        # The exporter reports its stages on stdout; the library never prints.
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_shapes=dynamic_shapes if axes else None,
                opset_version=profile.export.opset,
                verbose=False,
                optimize=True,
            )
    except Exception as error:  # torch.export raises many unrelated types
        logger.debug("torch.onnx output:\n%s", captured.getvalue())
        raise ExportError(
            f"ONNX export of {spec.name} failed: {first_line(error)} (run with -v for details)"
        ) from error
    logger.debug("torch.onnx output:\n%s", captured.getvalue())
    if program is None:  # only the legacy exporter returns None
        raise ExportError(f"ONNX export of {spec.name} returned no program")
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
    _strip_debug_metadata(program.model)
    program.model.metadata_props["modelkiln.component"] = spec.name
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx_ir.save(program.model, path, external_data=f"{path.stem}.onnx_data")
    else:
        onnx_ir.save(program.model, path)
    return path


def _strip_debug_metadata(model: Any) -> None:
    """Drop the exporter's per-node stack traces and FX dumps (40 % of a small ViT's file)."""
    import onnx_ir

    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
    for value in [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()


class OnnxExporter(Exporter):
    format = "onnx"
    default_runtime = "onnxruntime"
    weight_precisions: ClassVar[frozenset[str]] = frozenset({"fp32"})
    packages = ("torch", "onnx", "onnxscript", "onnx_ir")
    extra = "onnxruntime"

    def export(self, spec: ComponentSpec, module: Any, profile: Profile, root: Path) -> Path:
        return onnx_from_torch(spec, module, profile, self.directory(spec, root) / MODEL_FILE)
