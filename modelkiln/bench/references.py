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
from typing import Any

import numpy as np

from modelkiln.artifact import Manifest
from modelkiln.errors import KilnError, SourceError
from modelkiln.progress import Progress

OUTPUTS = "outputs.npz"
LABELS = "labels.npy"
IMAGES = "image-{index}.png"


def source_hash(manifest: Manifest) -> str:
    """Which weights an artifact was built from: a digest of the recorded weight hashes."""
    weights = manifest.source.get("weights_sha256") or {}
    basis = json.dumps(sorted(weights.items()) or manifest.source.get("spec", ""))
    return hashlib.sha256(basis.encode()).hexdigest()[:16]


def reference_key(manifest: Manifest) -> str:
    """Same weights and same export shapes: the same reference outputs."""
    shapes = json.dumps(manifest.profile.get("shapes", {}), sort_keys=True)
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
    from modelkiln.profiles import Profile
    from modelkiln.sources import resolve_source

    spec = source or manifest.source.get("hub_id") or manifest.source["spec"]
    try:
        resolved = resolve_source(spec, revision=manifest.source.get("revision"))
        family = detect_family(resolved)
    except KilnError as error:
        raise SourceError(
            f"cannot load the torch reference of this artifact from {spec} ({error}); "
            "point --reference at a copy of the source model, or pass --no-reference"
        ) from error
    profile = Profile.from_dict(manifest.profile)
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
    recorded = manifest.source.get("weights_sha256")
    if recorded and loaded.weights != recorded:
        raise SourceError(
            f"the reference {spec} has other weights than the artifact was built from "
            f"(sha256 {_short(loaded.weights)} vs {_short(recorded)}); point --reference "
            "at the source the artifact was built from"
        )
    expected = quality.reference(loaded, profile, progress)
    folder.mkdir(parents=True, exist_ok=True)
    if expected.generated is not None:
        for index, image in enumerate(expected.generated):
            image.save(folder / IMAGES.format(index=index))
        return
    assert expected.outputs is not None
    names = list(expected.outputs[0])
    stacked = {name: np.concatenate([batch[name] for batch in expected.outputs]) for name in names}
    np.savez(folder / OUTPUTS, **stacked)  # type: ignore[arg-type]


def read_outputs(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / OUTPUTS) as stored:
        return {name: stored[name] for name in stored.files}


def read_images(folder: Path, count: int) -> list[Any]:
    from PIL import Image

    images = []
    for index in range(count):
        with Image.open(folder / IMAGES.format(index=index)) as image:
            images.append(image.convert("RGB"))
    return images


def _short(weights: dict[str, str]) -> str:
    return ",".join(digest[:12] for _, digest in sorted(weights.items()))


__all__ = ["compute", "read_images", "read_outputs", "reference_key", "source_hash"]
