"""The `torch` format: the reference weights as safetensors, reopened by the torch runtime.

It makes PyTorch one more row in every comparison (the demo, `kiln bench`) through the same
artifact, session and pipeline code as the deployed formats.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.exporters.base import Exporter
from modelkiln.runtimes.torch import component_file

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
    from modelkiln.specs import ComponentSpec


class TorchExporter(Exporter):
    format = "torch"
    backend = "torch"
    weight_precisions: ClassVar[frozenset[str]] = frozenset({"fp32"})
    packages = ("torch", "safetensors")

    def directory(self, spec: ComponentSpec, root: Path) -> Path:
        return root / (spec.reference_path if spec.reference_path is not None else spec.path)

    def export(
        self, spec: ComponentSpec, load_module: Callable[[], Any], profile: Profile, root: Path
    ) -> Path:
        out_dir = self.directory(spec, root)
        out_dir.mkdir(parents=True, exist_ok=True)
        spec.save_reference(out_dir)
        recipe = {"family": profile.family, "component": spec.name, "model": asdict(profile.model)}
        text = json.dumps(recipe, indent=2) + "\n"
        component_file(out_dir, spec.name).write_text(text, encoding="utf-8")
        return out_dir
