"""Which of an artifact's files a bundle holds: what the runtime and the pipeline read.

Everything else the artifact directory may hold (torch reference weights, notes, ...) stays
out. The selection works on kiln.json's file list, so it never picks up a stray file.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from modelkiln.backends import format_owner
from modelkiln.errors import ArtifactError
from modelkiln.models import FAMILIES
from modelkiln.records import Manifest

# Each component's config.json beside its model: the diffusion pipeline reads it.
COMPONENT_CONFIG = "config.json"


def bundle_files(manifest: Manifest) -> list[str]:
    """The artifact-relative paths of the files a bundle of this artifact holds (not kiln.json)."""
    # What the family's pipeline reads beside the models, and what the format's runtime opens
    # beside a component's entry (a directory entry, a Core ML .mlpackage, brings all of it).
    configs = FAMILIES.get(manifest.family).bundle_configs
    companion_patterns = format_owner(manifest.format).companions.get(manifest.format, ())
    listed = manifest.files
    selected: set[str] = set()
    for record in manifest.components.values():
        entry = PurePosixPath(record.entry)
        inside = [name for name in listed if name.startswith(f"{entry.as_posix()}/")]
        if entry.as_posix() not in listed and not inside:
            raise ArtifactError(
                f"kiln.json lists no file for component {record.name}'s entry {record.entry}; "
                "rebuild the artifact"
            )
        companions = [p.format(stem=entry.stem) for p in companion_patterns]
        beside = [entry, *(entry.parent / name for name in companions)]
        beside.append(entry.parent / COMPONENT_CONFIG)
        selected.update(inside)
        selected.update(path.as_posix() for path in beside if path.as_posix() in listed)
    for pattern in configs:
        if pattern.endswith("/"):
            selected.update(name for name in listed if name.startswith(pattern))
        elif pattern in listed:
            selected.add(pattern)
    return sorted(selected)
