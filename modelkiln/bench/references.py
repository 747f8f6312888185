"""The torch fp32 reference a benchmark scores artifacts against, computed once per source.

Artifacts built from the same weights at the same shapes share one reference: the source is
loaded once, run on the benchmark's images (or prompts), and its outputs are kept in a folder
that every measurement (in this process or an isolated child) reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from modelkiln.errors import KilnError, SourceError
from modelkiln.evaluation.end_to_end import (
    Outputs,
    PromptData,
    RealData,
    load_outputs,
    save_outputs,
)
from modelkiln.progress import Progress
from modelkiln.records import Manifest


def source_hash(manifest: Manifest) -> str:
    """Which weights an artifact was built from: a digest of the recorded weight hashes."""
    weights = manifest.source.weights_sha256
    basis = json.dumps(sorted(weights.items()) or manifest.source.spec)
    return hashlib.sha256(basis.encode()).hexdigest()[:16]


def reference_key(manifest: Manifest) -> str:
    """Same weights and same export shapes: the same reference outputs."""
    shapes = json.dumps(manifest.profile.to_dict().get("shapes", {}), sort_keys=True)
    digest = hashlib.sha256(shapes.encode()).hexdigest()[:8]
    return f"{source_hash(manifest)}-{digest}"


def compute(
    manifest: Manifest,
    folder: Path,
    *,
    data: str | None,
    prompts: tuple[str, ...],
    steps: int,
    source: str | None,
    progress: Progress,
) -> None:
    """Run the artifact's source in torch fp32 on the benchmark data; write it to `folder`."""
    from modelkiln import quality
    from modelkiln.models import detect_family
    from modelkiln.sources import resolve_source

    spec = source or manifest.source.location()
    try:
        resolved = resolve_source(spec, revision=manifest.source.revision)
        family = detect_family(resolved)
    except KilnError as error:
        raise SourceError(
            f"cannot load the torch reference of this artifact from {spec} ({error}); "
            "point --reference at a copy of the source model, or pass --no-reference"
        ) from error
    profile = manifest.profile
    validation = replace(
        profile.validation,
        data=None if prompts else data,
        prompts=tuple(prompts),
        steps=steps,
        seed=0,  # prompt i draws seed i: measure.py generates with the same seeds
        max_accuracy_drop=None,
    )
    profile = replace(profile, validation=validation)
    with progress.task(f"loading the torch reference {spec}"):
        loaded = family.load(resolved, profile)
    recorded = manifest.source.weights_sha256
    if recorded and loaded.weights != recorded:
        raise SourceError(
            f"the reference {spec} has other weights than the artifact was built from "
            f"(sha256 {_short(loaded.weights)} vs {_short(recorded)}); point --reference "
            "at the source the artifact was built from"
        )
    save_outputs(quality.reference(loaded, profile, progress), folder)


def read_outputs(folder: Path, data: RealData) -> Outputs:
    """The reference's results on `data`, as compute() saved them."""
    return load_outputs(folder, len(data.prompts) if isinstance(data, PromptData) else None)


def _short(weights: dict[str, str]) -> str:
    return ",".join(digest[:12] for _, digest in sorted(weights.items()))


__all__ = ["compute", "read_outputs", "reference_key", "source_hash"]
