"""`kiln package`: one artifact, one target, one .tar.gz or .zip with only what runs there."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from modelkiln.artifact import MANIFEST_NAME, find_problems, read_manifest, sha256_file
from modelkiln.errors import ArtifactError
from modelkiln.outputs import check_writable
from modelkiln.packaging.archive import require_suffix, write_archive
from modelkiln.packaging.contents import bundle_files
from modelkiln.packaging.manifest import BUNDLE_MANIFEST, BundleManifest, write_bundle_manifest
from modelkiln.packaging.readme import render_readme
from modelkiln.packaging.targets import canonical_target, requirement_name, requirements
from modelkiln.packaging.unpack import artifact_root
from modelkiln.progress import NullProgress, Progress
from modelkiln.records import FileRecord, seal

README = "README.md"


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: BundleManifest
    # The artifact's files the target does not need (kiln.json's other entries).
    left_out: tuple[str, ...]

    @property
    def size(self) -> int:
        return sum(record.size for record in self.manifest.files.values())


def package(
    artifact: str | Path, target: str, output: str | Path, *, progress: Progress | None = None
) -> Bundle:
    """Pack the files artifact (a directory or a bundle) needs on target into output.

    Every packed file is re-hashed against kiln.json first: a damaged artifact is refused,
    not shipped. output appears (or replaces an earlier bundle) only once it is complete.
    """
    progress = progress or NullProgress()
    target = canonical_target(target)  # an alias (linux-arm64) is recorded under our name
    output = Path(output)
    require_suffix(output)
    check_writable(output, folder=False)
    root = artifact_root(artifact)
    manifest = read_manifest(root)
    needs = requirements(target, manifest.format, manifest.profile)
    selected = bundle_files(manifest)
    files = {name: manifest.files[name] for name in selected}
    with progress.task(f"checking {len(files)} files against {MANIFEST_NAME}"):
        problems = find_problems(root, replace(manifest, files=files), hashes=True)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactError(
            f"cannot package {root}: {problems[0]}{more}; rebuild the artifact "
            "(`kiln verify` lists every problem)"
        )
    names = {requirement_name(requirement) for requirement in needs}
    validated_with = {k: v for k, v in manifest.versions.items() if k in names}
    with tempfile.TemporaryDirectory(prefix="kiln-package-") as scratch:
        generated = {MANIFEST_NAME: Path(scratch, MANIFEST_NAME), README: Path(scratch, README)}
        _write_narrowed_manifest(root / MANIFEST_NAME, selected, generated[MANIFEST_NAME])
        text = render_readme(manifest, target, needs, validated_with, output.name, selected)
        generated[README].write_text(text, encoding="utf-8")
        for name, path in generated.items():
            files[name] = FileRecord(path.stat().st_size, sha256_file(path))
        bundle_manifest = BundleManifest(
            target=target,
            format=manifest.format,
            runtime=manifest.runtime,
            family=manifest.family,
            task=manifest.task,
            profile=manifest.profile.name,
            requirements=needs,
            validated_with=validated_with,
            modelkiln_version=manifest.modelkiln_version,
            files=dict(sorted(files.items())),
        )
        write_bundle_manifest(Path(scratch), bundle_manifest)
        # bundle.json first: a reader streaming the archive learns what to expect up front.
        members = [
            (BUNDLE_MANIFEST, Path(scratch, BUNDLE_MANIFEST)),
            (README, generated[README]),
            (MANIFEST_NAME, generated[MANIFEST_NAME]),
            *((name, root / name) for name in selected),
        ]
        with progress.task(f"writing {output.name}"):
            write_archive(output, members)
    left_out = tuple(sorted(manifest.files.keys() - set(selected)))
    return Bundle(output, bundle_manifest, left_out)


def _write_narrowed_manifest(source: Path, selected: list[str], target: Path) -> None:
    """kiln.json as built, its file list cut to what the bundle holds: loading the unpacked
    bundle checks those. Edited as raw JSON so that no field of the build record is lost."""
    data = json.loads(source.read_text(encoding="utf-8"))
    kept = set(selected)
    # The build's order: an artifact packed whole keeps its kiln.json byte for byte.
    data["files"] = {name: record for name, record in data["files"].items() if name in kept}
    target.write_text(json.dumps(seal(data), indent=2) + "\n", encoding="utf-8")
