"""torch -> OpenVINO IR (openvino_model.xml/.bin), converted from the module or from our ONNX."""

from __future__ import annotations

import io
import logging
import multiprocessing
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from modelkiln.errors import ExportError, first_line
from modelkiln.exporters.base import Exporter, export_dims
from modelkiln.exporters.onnx import onnx_from_torch
from modelkiln.quiet import printing_into
from modelkiln.runtimes.openvino import OpenVINOSettings

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
    from modelkiln.specs import ComponentSpec

logger = logging.getLogger(__name__)

MODEL_FILE = "openvino_model.xml"
# ONNX files above this are converted in a fresh process (peak memory ~1.03x the weights).
SUBPROCESS_ABOVE_BYTES = 1_000_000_000


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


def ir_file_from_onnx(onnx_path: str, xml_path: str, compress_to_fp16: bool) -> None:
    """ONNX file -> IR files. share_weights=False: with the default, the mmap'd ONNX weights
    stay resident beside the converter's folded copies (SD-1.5 UNet: 1.31x vs 1.03x)."""
    import openvino as ov

    model = ov.convert_model(onnx_path, share_weights=False)
    ov.save_model(model, xml_path, compress_to_fp16=compress_to_fp16)


def ir_from_onnx(onnx_path: Path, xml_path: Path, compress_to_fp16: bool) -> None:
    """Convert in a fresh process when the weights are large: nothing else is resident there."""
    data = onnx_path.with_name(f"{onnx_path.stem}.onnx_data")
    size = onnx_path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    job = (str(onnx_path), str(xml_path), compress_to_fp16)
    if size < SUBPROCESS_ABOVE_BYTES:
        ir_file_from_onnx(*job)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        pool.submit(ir_file_from_onnx, *job).result()


class OpenVINOExporter(Exporter):
    format = "openvino"
    backend = "openvino"
    extra = "openvino-build"
    weight_precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16"})
    packages = ("torch", "openvino")

    def export(
        self, spec: ComponentSpec, load_module: Callable[[], Any], profile: Profile, root: Path
    ) -> Path:
        import openvino as ov

        out_dir = self.directory(spec, root)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / MODEL_FILE
        compress = profile.precision.weights == "fp16"
        captured = io.StringIO()
        try:
            with (
                printing_into(captured),
                # Inside the staging artifact: a killed build's scratch goes with it.
                tempfile.TemporaryDirectory(prefix=".scratch-", dir=root) as scratch,
            ):
                if OpenVINOSettings.of(profile).via == "onnx":
                    onnx_path = onnx_from_torch(
                        spec, load_module, profile, Path(scratch) / "model.onnx"
                    )
                    ir_from_onnx(onnx_path, path, compress)
                else:
                    model = ir_from_torch(spec, load_module(), profile)
                    # Tracing does not always carry the wrapper's names through (outputs; and
                    # inputs whose shape the graph reads, as DINOv2's position interpolation).
                    ports = [*zip(model.inputs, spec.inputs, strict=True)]
                    ports += zip(model.outputs, spec.outputs, strict=True)
                    for port, name in ports:
                        port.get_tensor().set_names({name})
                    ov.save_model(model, str(path), compress_to_fp16=compress)
        except ExportError:
            raise
        except Exception as error:  # the converter raises many unrelated types
            logger.debug("openvino conversion output:\n%s", captured.getvalue())
            raise ExportError(
                f"OpenVINO conversion of {spec.name} failed: {first_line(error)} "
                "(run with -v for details)"
            ) from error
        if spec.config_file is not None:
            (out_dir / "config.json").write_bytes(spec.config_file)
        return path

    def complete(self, root: Path) -> None:
        """OpenVINO GenAI reads tokenizers as IRs: every tokenizer folder of the artifact also
        gets openvino_tokenizer.xml and openvino_detokenizer.xml (openvino-tokenizers)."""
        folders = sorted(path.parent for path in root.glob("*/tokenizer_config.json"))
        if not folders:
            return
        try:
            from openvino_tokenizers import convert_tokenizer
        except Exception as error:  # absent, or built for another OpenVINO release
            logger.warning(
                "no tokenizer IRs (%s): modelkiln runs this artifact, OpenVINO GenAI does not; "
                "pip install 'modelkiln[openvino-build]' for both",
                first_line(error),
            )
            return
        import openvino as ov
        from transformers import AutoTokenizer

        for folder in folders:
            captured = io.StringIO()
            try:
                with printing_into(captured):
                    source = AutoTokenizer.from_pretrained(folder)
                    tokenizer, detokenizer = convert_tokenizer(source, with_detokenizer=True)
                    ov.save_model(tokenizer, str(folder / "openvino_tokenizer.xml"))
                    ov.save_model(detokenizer, str(folder / "openvino_detokenizer.xml"))
            except Exception as error:  # the converter raises many unrelated types
                raise ExportError(
                    f"converting {folder.name} for OpenVINO GenAI failed: {first_line(error)}"
                ) from error
