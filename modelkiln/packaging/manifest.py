"""bundle.json: what a bundle is for, and the size and sha256 of every file in it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modelkiln.artifact import MANIFEST_NAME, read_manifest, record_files, sha256_file
from modelkiln.errors import ArtifactError, IntegrityError
from modelkiln.jsonfile import read_json_object
from modelkiln.records import FileRecord

BUNDLE_MANIFEST = "bundle.json"
SCHEMA = "modelkiln-bundle"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BundleManifest:
    target: str
    # The artifact's facts, copied from its kiln.json.
    format: str
    runtime: str
    family: str
    task: str
    profile: str
    # What the target needs installed to run the format ("onnxruntime>=1.19", "iOS>=17").
    requirements: tuple[str, ...]
    # The versions of those packages that validated the build.
    validated_with: dict[str, str]
    modelkiln_version: str
    # Every file in the bundle but bundle.json itself: kiln.json and README.md included.
    files: dict[str, FileRecord]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["requirements"] = list(self.requirements)
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> BundleManifest:
        schema = (data.get("schema"), data.get("schema_version"))
        if schema != (SCHEMA, SCHEMA_VERSION):
            raise ArtifactError(
                f"{where} has schema {schema[0]!r} version {schema[1]!r}; this modelkiln reads "
                f"{SCHEMA!r} version {SCHEMA_VERSION}: package the artifact again or upgrade"
            )
        try:
            return cls(
                target=data["target"],
                format=data["format"],
                runtime=data["runtime"],
                family=data["family"],
                task=data["task"],
                profile=data["profile"],
                requirements=tuple(data["requirements"]),
                validated_with=dict(data["validated_with"]),
                modelkiln_version=data["modelkiln_version"],
                files={k: FileRecord(**v) for k, v in data["files"].items()},
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ArtifactError(
                f"{where} is malformed ({type(error).__name__}: {error}); package it again"
            ) from error


def write_bundle_manifest(root: Path, manifest: BundleManifest) -> None:
    text = json.dumps(manifest.to_json(), indent=2)
    (root / BUNDLE_MANIFEST).write_text(text + "\n", encoding="utf-8")


def read_bundle_manifest(root: Path, bundle: Path) -> BundleManifest:
    """bundle.json of the unpacked bundle at root (bundle: the file, for messages)."""
    path = root / BUNDLE_MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{bundle} is not a modelkiln bundle (no {BUNDLE_MANIFEST}); "
            "make one with `kiln package ARTIFACT --target TARGET -o BUNDLE`"
        )
    data = read_json_object(path, ArtifactError, f"{BUNDLE_MANIFEST} of {bundle}")
    return BundleManifest.from_json(data, f"{BUNDLE_MANIFEST} of {bundle}")


def check_unpacked(root: Path, bundle: Path) -> BundleManifest:
    """bundle.json of the bundle unpacked at root, once every file matches it; else raise."""
    manifest = read_bundle_manifest(root, bundle)
    problems = find_bundle_problems(root, manifest)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise IntegrityError(
            f"bundle {bundle} failed verification: {problems[0]}{more}; "
            "package the artifact again (`kiln package`)"
        )
    return manifest


def find_bundle_problems(root: Path, manifest: BundleManifest) -> list[str]:
    """Missing, changed and unlisted files, and disagreements with kiln.json; empty when intact."""
    found = record_files(root)  # every file but kiln.json, which bundle.json lists too
    found.pop(BUNDLE_MANIFEST, None)
    if (root / MANIFEST_NAME).is_file():
        found[MANIFEST_NAME] = FileRecord(
            (root / MANIFEST_NAME).stat().st_size, sha256_file(root / MANIFEST_NAME)
        )
    problems = []
    for name, record in manifest.files.items():
        got = found.get(name)
        if got is None:
            problems.append(f"{name} is missing")
        elif got.size != record.size:
            problems.append(f"{name} has {got.size} bytes, {BUNDLE_MANIFEST} says {record.size}")
        elif got.sha256 != record.sha256:
            problems.append(f"{name} has changed (sha256 differs from {BUNDLE_MANIFEST})")
    unlisted = sorted(found.keys() - manifest.files.keys())
    problems += [f"{name} is not listed in {BUNDLE_MANIFEST}" for name in unlisted]
    if not problems and MANIFEST_NAME not in found:
        problems.append(f"{MANIFEST_NAME} is missing")
    if problems:
        return problems
    # Files that match bundle.json must also be the files the artifact's build recorded.
    for name, record in read_manifest(root).files.items():
        if manifest.files.get(name) != record:
            problems.append(f"{name} differs between {MANIFEST_NAME} and {BUNDLE_MANIFEST}")
    return problems
