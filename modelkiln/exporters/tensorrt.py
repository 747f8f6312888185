"""torch -> ONNX -> TensorRT engine (model.engine), built on this machine's CUDA GPU.

export() writes our ONNX (the quantizers of modelkiln.quantize.tensorrt rewrite it in place);
finish() builds the engine from it. The ONNX stays in the artifact beside the engine and its
engine.json, so that a runtime on another GPU model or TensorRT version can rebuild the engine
into its own cache (modelkiln.tensorrt.build).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.exporters.base import Exporter
from modelkiln.exporters.onnx import MODEL_FILE, onnx_from_torch
from modelkiln.tensorrt.build import ENGINE_FILE, engine_from_onnx, write_record
from modelkiln.tensorrt.device import current_device, import_tensorrt, require_cuda
from modelkiln.tensorrt.onnx_checks import check_onnx
from modelkiln.tensorrt.recipe import recipe_for
from modelkiln.tensorrt.settings import TensorRTSettings

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
    from modelkiln.specs import ComponentSpec

logger = logging.getLogger(__name__)


class TensorRTExporter(Exporter):
    format = "tensorrt"
    backend = "tensorrt"
    extra = "tensorrt"
    # The ONNX source stays fp32; the compute precision picks the builder's flags.
    weight_precisions: ClassVar[frozenset[str]] = frozenset({"fp32"})
    packages = ("torch", "onnx", "onnxscript", "onnx_ir", "tensorrt")

    @classmethod
    def require(cls) -> None:
        super().require()
        # Before the model loads and exports for minutes: the build ends on the GPU.
        require_cuda("format 'tensorrt'")

    def export(
        self, spec: ComponentSpec, load_module: Callable[[], Any], profile: Profile, root: Path
    ) -> Path:
        recipe_for(spec, profile)  # a profile the engine cannot have fails before the export
        directory = self.directory(spec, root)
        path = onnx_from_torch(spec, load_module, profile, directory / MODEL_FILE)
        if spec.config_file is not None:
            (directory / "config.json").write_bytes(spec.config_file)
        return path

    def finish(self, spec: ComponentSpec, entry: Path, profile: Profile) -> Path:
        """Build (or take from the engine cache) `<component>/model.engine` from the ONNX."""
        recipe = recipe_for(spec, profile)
        require_cuda(f"{spec.name}: format 'tensorrt'")
        found = check_onnx(entry)
        logger.debug("%s: ONNX for TensorRT: %s", spec.name, found)
        device = current_device(import_tensorrt())
        engine = entry.with_name(ENGINE_FILE)
        settings = TensorRTSettings.of(profile)
        record = engine_from_onnx(
            entry,
            engine,
            recipe,
            device,
            engine_cache=settings.engine_cache,
            timing_cache=settings.timing_cache,
        )
        write_record(engine.parent, record)
        return engine
