"""The source model as its pipeline on the torch runtime, before anything is exported.

Calibration runs it to collect real inputs of every component (a prompt becomes UNet inputs
at every denoising step), and the end-to-end quality gate and `kiln bench` compare an
artifact's results with its. It is the pipeline class kiln.json will name, over
TorchModuleSessions on the source modules: the only difference between the two is the export.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln.exporters.base import export_signature
from modelkiln.models import FAMILIES
from modelkiln.pipelines.base import APPROXIMATIONS, Pipeline, PipelineParts
from modelkiln.runtimes.base import Session
from modelkiln.runtimes.torch import TorchModuleSession

if TYPE_CHECKING:
    from modelkiln.models.base import LoadedModel
    from modelkiln.profiles import Profile


class RecordingSession(Session):
    """Passes every call through and keeps a copy of its feeds (the calibration data)."""

    def __init__(self, inner: Session) -> None:
        super().__init__(inner.name, inner.input_specs, inner.output_specs)
        self.inner = inner
        self.feeds: list[dict[str, np.ndarray]] = []

    @property
    def info(self) -> dict[str, Any]:
        return self.inner.info

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        self.feeds.append({name: np.array(value, copy=True) for name, value in feeds.items()})
        return self.inner.run(feeds, output_names)

    def close(self) -> None:
        self.inner.close()


@contextlib.contextmanager
def reference_pipeline(
    loaded: LoadedModel,
    profile: Profile,
    wrap: Callable[[Session], Session] = lambda session: session,
    *,
    exact: bool = True,
) -> Iterator[Pipeline]:
    """The model's pipeline over the source's torch modules, at the profile's export shapes;
    `exact`: without the build's approximations (what the gate compares with), else as the
    artifact will run (what calibration records, the shallow UNet's inputs included).

    Every component's module is in memory while it is open (SD-1.5: 4.3 GB fp32).
    """
    sessions: dict[str, Session] = {}
    try:
        for spec in loaded.components:
            inputs, outputs = export_signature(spec, profile.for_component(spec.name))
            exact_module = spec.exact_module if exact else None
            module = (exact_module or spec.module)()
            sessions[spec.name] = wrap(TorchModuleSession(module, spec.name, inputs, outputs))
        with tempfile.TemporaryDirectory(prefix="kiln-reference-") as scratch:
            root = Path(scratch)
            # The pipeline reads its configs (model_index.json, tokenizers, ...) from its root.
            for name, content in loaded.config_files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(content)
            configs = {
                spec.name: json.loads(spec.config_file or b"{}") for spec in loaded.components
            }
            # The gate's reference is the exact pipeline: the artifact's approximations are
            # measured against it, never made by it (calibration asks for them: not exact).
            info = {k: v for k, v in loaded.model_info.items() if k != APPROXIMATIONS or not exact}
            parts = PipelineParts(root, sessions, configs, info, loaded.task)
            yield pipeline_class(loaded).from_parts(parts)
    finally:
        for session in sessions.values():
            session.close()


def pipeline_class(loaded: LoadedModel) -> type[Pipeline]:
    """The pipeline that runs the loaded model (and will run its artifact)."""
    return FAMILIES.get(loaded.family).pipeline_class(loaded.pipeline)


__all__ = ["RecordingSession", "pipeline_class", "reference_pipeline"]
