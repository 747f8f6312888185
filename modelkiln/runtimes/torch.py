"""The torch backend: the source module itself, behind the same Session interface; its
descriptor, and the `torch` format's runtime.

The build validates every export against a `TorchModuleSession`; the `torch` format stores the
reference weights so that the same session can be reopened from an artifact.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from modelkiln.backends import Backend
from modelkiln.errors import ArtifactError, UnsupportedError
from modelkiln.runtimes.base import Runtime, RuntimeOptions, Session, resolved
from modelkiln.specs import TensorSpec

if TYPE_CHECKING:
    import torch


def component_file(directory: Path, component: str) -> Path:
    """Written by the torch exporter beside the saved weights: how to rebuild the component.

    One per component: diffusers keeps two components (the VAE halves) in one directory.
    """
    return directory / f"modelkiln_{component}.json"


class TorchModuleSession(Session):
    def __init__(
        self,
        module: torch.nn.Module,
        name: str,
        inputs: Mapping[str, TensorSpec],
        outputs: Mapping[str, TensorSpec],
        options: RuntimeOptions | None = None,
    ) -> None:
        import torch

        super().__init__(name, inputs, outputs)
        options = options or RuntimeOptions()
        if options.device != "cpu":
            raise UnsupportedError(
                f"the torch runtime runs on 'cpu' only here, not '{options.device}'"
            )
        if options.threads:
            torch.set_num_threads(options.threads)
        self._module = module.eval()
        self._precision = options.compute_precision

    @property
    def info(self) -> dict[str, Any]:
        import torch

        precision = {"fp32": "f32", "bf16": "bf16"}[self._precision]
        return {
            "runtime": "torch",
            "inference_precision": precision,
            "threads": torch.get_num_threads(),
        }

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        import torch

        tensors = [torch.from_numpy(feeds[name]) for name in self.input_specs]
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if self._precision == "bf16"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            results = self._module(*tensors)
        return {
            name: tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
            for name, tensor in zip(self.output_specs, results, strict=True)
        }

    def close(self) -> None:
        self._module = None  # type: ignore[assignment]


class TorchRuntime(Runtime):
    name = "torch"
    formats: ClassVar[frozenset[str]] = frozenset({"torch"})
    compute_precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "bf16"})
    native_bf16 = True
    package = "torch"
    distribution = "torch"
    session_class = TorchModuleSession  # opened from an in-memory module; open() rebuilds it

    def open(
        self,
        entry: Path,
        name: str,
        inputs: Mapping[str, TensorSpec],
        outputs: Mapping[str, TensorSpec],
        options: RuntimeOptions,
    ) -> Session:
        from modelkiln.models import FAMILIES

        self.require()
        description = component_file(entry, name)
        try:
            recipe = json.loads(description.read_text(encoding="utf-8"))
            family = FAMILIES.get(recipe["family"])
        except (OSError, ValueError, KeyError) as error:
            raise ArtifactError(
                f"{description} is missing or malformed ({error}); rebuild the artifact"
            ) from error
        module = family.reference_module(entry, recipe["component"], recipe["model"])
        if recipe.get("quantization"):
            # Stored as fp32 plus the recipe's scheme (modelkiln.quantize.torch): quantize
            # again, whatever the family, before anything runs.
            from modelkiln.quantize.torch import apply

            apply(module, recipe["quantization"])
        return TorchModuleSession(module, name, inputs, outputs, resolved(options, type(self)))


class TorchBackend(Backend):
    name = "torch"
    summary = "the source's own torch modules (safetensors), the reference every format meets"
    runtime = "modelkiln.runtimes.torch:TorchRuntime"
    exporters: ClassVar[Mapping[str, str]] = {"torch": "modelkiln.exporters.torch:TorchExporter"}
    quantizers = "modelkiln.quantize.torch"
    packages = ("torch",)
    libraries = ("torch", "torchao")
