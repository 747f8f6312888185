"""Open a built artifact and hand its Sessions to the pipeline of its task. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from modelkiln.artifact import Manifest, check_intact, read_manifest
from modelkiln.errors import ArtifactError, UnsupportedError
from modelkiln.packaging.unpack import artifact_root
from modelkiln.preprocess import ImagePreprocessor
from modelkiln.registry import Registry
from modelkiln.runtimes import RUNTIMES, Runtime, RuntimeOptions, Session

PIPELINES: Registry[Any] = Registry(
    "task",
    {
        "image-classification": "modelkiln.pipelines.classification:ImageClassificationPipeline",
        "image-feature-extraction": "modelkiln.pipelines.embedding:ImageEmbeddingPipeline",
        "text-to-image": "modelkiln.pipelines.diffusion:DiffusionPipeline",
        "inpainting": "modelkiln.pipelines.diffusion:InpaintingPipeline",
    },
)


@dataclass(frozen=True)
class Artifact:
    root: Path
    manifest: Manifest

    def runtime(self, name: str | None = None) -> Runtime:
        """The named runtime (default: the one that validated the build), if it can run us."""
        name = name or self.manifest.runtime
        runtime = RUNTIMES.get(name)
        if self.manifest.format not in runtime.formats:
            able = [n for n in RUNTIMES if self.manifest.format in RUNTIMES.get(n).formats]
            raise UnsupportedError(
                f"runtime '{name}' cannot run a {self.manifest.format} artifact; "
                f"use one of: {', '.join(able)}"
            )
        runtime.require()
        return runtime()

    def runtime_options(self, component: str | None = None, **overrides: Any) -> RuntimeOptions:
        """The profile's runtime settings for a component, with every non-None override applied."""
        options = RuntimeOptions.from_profile(self.manifest.profile, component)
        known = {f.name for f in fields(RuntimeOptions)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown runtime option(s): {', '.join(sorted(unknown))}")
        return replace(options, **{k: v for k, v in overrides.items() if v is not None})

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
            self.runtime_options(component, **overrides),
        )

    def preprocessor(self) -> ImagePreprocessor:
        return ImagePreprocessor.from_dict(self.manifest.model_info["preprocessing"])


def open_artifact(root: str | Path, *, verify: bool = False) -> Artifact:
    """Read kiln.json and check that every file is present with its recorded size.

    root is an artifact directory or a bundle (`kiln package`), which is unpacked into the
    cache on first use. verify=True also re-hashes every file against the manifest's sha256.
    """
    root = artifact_root(root)
    manifest = read_manifest(root)
    check_intact(root, manifest, hashes=verify)
    return Artifact(root, manifest)


def load(
    root: str | Path,
    *,
    runtime: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    performance_hint: str | None = None,
    compute_precision: str | None = None,
    verify: bool = False,
) -> Any:
    """The pipeline (classification, embeddings, ...) of an artifact or bundle on a runtime.

    None means "as the profile says": the runtime that validated the build, its device,
    threads, performance hint and compute precision.
    """
    artifact = open_artifact(root, verify=verify)
    pipeline = PIPELINES.get(artifact.manifest.task)
    return pipeline.from_artifact(
        artifact,
        runtime=runtime,
        device=device,
        threads=threads,
        performance_hint=performance_hint,
        compute_precision=compute_precision,
    )
