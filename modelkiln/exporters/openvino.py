"""torch -> OpenVINO IR (openvino_model.xml/.bin), converted from the module or from our ONNX."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from modelkiln.errors import ExportError
from modelkiln.exporters.base import Exporter, export_dims, first_line
from modelkiln.exporters.onnx import onnx_from_torch

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
    from modelkiln.specs import ComponentSpec

logger = logging.getLogger(__name__)

MODEL_FILE = "openvino_model.xml"


def ir_from_torch(spec: ComponentSpec, module: Any, profile: Profile) -> Any:
    """ov.convert_model on the torch module, with named inputs and dynamic dims as -1."""
    import openvino as ov
    import torch

    dims, dynamic = export_dims(spec, profile)
    example = spec.dummy_inputs(dims, seed=profile.validation.seed)
    inputs = []
    for name, tensor in spec.inputs.items():
        shape = [
            -1 if dim in dynamic else size
            for dim, size in zip(tensor.shape, tensor.concrete_shape(dims), strict=True)
        ]
        inputs.append((name, ov.PartialShape(shape), ov.Type(np.dtype(tensor.dtype))))
    with torch.no_grad():
        return ov.convert_model(
            module,
            example_input=tuple(torch.from_numpy(example[n]) for n in spec.inputs),
            input=inputs,
        )


def ir_from_onnx(spec: ComponentSpec, module: Any, profile: Profile, scratch: Path) -> Any:
    import openvino as ov

    return ov.convert_model(str(onnx_from_torch(spec, module, profile, scratch / "model.onnx")))


class OpenVINOExporter(Exporter):
    format = "openvino"
    default_runtime = "openvino"
    weight_precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16"})
    packages = ("torch", "openvino")
    extra = "openvino"

    def export(self, spec: ComponentSpec, module: Any, profile: Profile, root: Path) -> Path:
        import openvino as ov

        out_dir = self.directory(spec, root)
        out_dir.mkdir(parents=True, exist_ok=True)
        captured = io.StringIO()
        try:
            with (
                contextlib.redirect_stdout(captured),
                warnings.catch_warnings(),
                tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch,
            ):
                warnings.simplefilter("ignore")
                if profile.export.via == "onnx":
                    model = ir_from_onnx(spec, module, profile, Path(scratch))
                else:
                    model = ir_from_torch(spec, module, profile)
        except ExportError:
            raise
        except Exception as error:  # the converter raises many unrelated types
            logger.debug("openvino conversion output:\n%s", captured.getvalue())
            raise ExportError(
                f"OpenVINO conversion of {spec.name} failed: {first_line(error)} "
                "(run with -v for details)"
            ) from error
        # Name outputs explicitly: tracing does not always carry the wrapper's names through.
        for port, name in zip(model.outputs, spec.outputs, strict=True):
            port.get_tensor().set_names({name})
        path = out_dir / MODEL_FILE
        ov.save_model(model, str(path), compress_to_fp16=profile.precision.weights == "fp16")
        return path
