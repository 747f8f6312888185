"""Open a built artifact and hand its Sessions to the pipeline kiln.json names. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.artifact import check_intact, read_manifest
from modelkiln.backends import BACKENDS, runtime_backend, runtimes_for
from modelkiln.errors import ArtifactError, UnsupportedError
from modelkiln.models import FAMILIES
from modelkiln.packaging.unpack import artifact_root
from modelkiln.preprocess import ImagePreprocessor
from modelkiln.records import Manifest
from modelkiln.runtimes import Runtime, RuntimeOptions, Session

if TYPE_CHECKING:
    from modelkiln.pipelines.base import Pipeline


@dataclass(frozen=True)
class Artifact:
    root: Path
    manifest: Manifest

    def runtime(self, name: str | None = None) -> Runtime:
        """The named runtime (default: the one that validated the build), if it can run us."""
        runtime = runtime_backend(name or self.manifest.runtime).runtime_class()
        if self.manifest.format not in runtime.formats:
            raise UnsupportedError(
                f"runtime '{runtime.name}' cannot run a {self.manifest.format} artifact; "
                f"use one of: {', '.join(runtimes_for(self.manifest.format))}"
            )
        runtime.require()
        return runtime()

    def runtime_options(
        self, component: str | None = None, runtime: str | None = None, **overrides: Any
    ) -> RuntimeOptions:
        """The profile's runtime settings for a component on `runtime` (default: the built
        one), with every non-None override applied (generic ones, or the runtime's own)."""
        backend = BACKENDS.get(runtime or self.manifest.runtime)
        options = RuntimeOptions.for_profile(self.manifest.profile, backend.settings, component)
        return options.with_overrides(**overrides)

    def session(self, component: str, runtime: str | None = None, **overrides: Any) -> Session:
        if component not in self.manifest.components:
            raise ArtifactError(
                f"{self.root} has no component '{component}'; it has: "
                f"{', '.join(self.manifest.components)}"
            )
        record = self.manifest.components[component]
        return self.runtime(runtime).open(
            self.root / record.entry,
            record.name,
            record.inputs,
            record.outputs,
            self.runtime_options(component, runtime, **overrides),
        )

    def preprocessor(self) -> ImagePreprocessor:
        return ImagePreprocessor.from_dict(self.manifest.model_info["preprocessing"])

    def pipeline_class(self) -> type[Pipeline]:
        """The pipeline kiln.json names, from the artifact's family."""
        return FAMILIES.get(self.manifest.family).pipeline_class(self.manifest.pipeline)


def open_artifact(root: str | Path, *, verify: bool = True) -> Artifact:
    """Read kiln.json (refused if edited: it carries its own digest) and check every file.

    root is an artifact directory or a bundle (`kiln package`), which is unpacked into the
    cache on first use. verify=True (the default) checks every file's content against the
    manifest's sha256, hashing only what changed since it last did on this machine
    (modelkiln.integrity); verify=False checks presence and sizes only.
    """
    root = artifact_root(root)
    manifest = read_manifest(root)
    check_intact(root, manifest, hashes=verify, remembered=True)
    return Artifact(root, manifest)


def load(
    root: str | Path,
    *,
    runtime: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    compute_precision: str | None = None,
    verify: bool = True,
    low_memory: bool = False,
    **options: Any,
) -> Any:
    """The pipeline (classification, embeddings, generation, ...) of an artifact or bundle.

    None means "as the profile says": the runtime that validated the build, its device,
    threads and compute precision. `options` are the runtime's own settings (OpenVINO's
    performance_hint, ...), as in its profile section. `verify`: see open_artifact.
    `low_memory`: one component in memory at a time, each loaded when the pipeline calls it
    (runtimes/on_demand.py): slower, for models near the machine's memory.
    """
    artifact = open_artifact(root, verify=verify)
    return artifact.pipeline_class().from_artifact(
        artifact,
        runtime=runtime,
        low_memory=low_memory,
        device=device,
        threads=threads,
        compute_precision=compute_precision,
        **options,
    )
