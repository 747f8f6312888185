"""Opening a bundle: unpack it once into the cache, checked, and hand back the directory.

The cache entry is named by the bundle's sha256, so a changed bundle never reuses an old
entry, and it appears only complete: unpacked into a staging sibling, checked against
bundle.json, then renamed into place (outputs.py), one process at a time.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from modelkiln.artifact import sha256_file
from modelkiln.errors import ArtifactError
from modelkiln.integrity import Remembered
from modelkiln.outputs import output_lock, prepare_directory, replacing
from modelkiln.packaging.archive import extract_archive, is_bundle, require_suffix
from modelkiln.packaging.manifest import (
    BUNDLE_MANIFEST,
    BundleManifest,
    check_unpacked,
    read_bundle_manifest,
)

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where bundles are unpacked: bundles/ under $MODELKILN_CACHE (~/.cache/modelkiln)."""
    from modelkiln.env import cache_home

    return cache_home() / "bundles"


def artifact_root(path: str | Path) -> Path:
    """The directory to read an artifact from: path itself, or a bundle's unpacked copy."""
    path = Path(path)
    return unpack_bundle(path) if is_bundle(path) else path


def verify_bundle(bundle: str | Path) -> BundleManifest:
    """Unpack bundle into scratch space and check every file against its bundle.json."""
    bundle = _existing(bundle)
    root = cache_root()
    prepare_directory(root)
    # Beside the cache, not in /tmp: a bundle needs as much room here as loading it will.
    with tempfile.TemporaryDirectory(prefix=".verifying-", dir=root) as scratch:
        _extract(bundle, Path(scratch))
        return check_unpacked(Path(scratch), bundle)


def unpack_bundle(bundle: str | Path) -> Path:
    """The checked, unpacked copy of bundle in the cache; unpacked on first use only."""
    bundle = _existing(bundle)
    root = cache_root()
    target = root / sha256_file(bundle)
    if _complete(target):
        return target
    prepare_directory(root)
    # One process unpacks a bundle; the others wait for it and then find the copy complete.
    with output_lock(target):
        if _complete(target):
            return target
        if target.exists():
            logger.warning("replacing the damaged unpacked copy of %s at %s", bundle, target)
        with replacing(target, marker=None) as staging:
            _extract(bundle, staging)
            check_unpacked(staging, bundle)
    logger.info("unpacked %s into %s", bundle, target)
    return target


def _extract(bundle: Path, into: Path) -> None:
    """Unpack bundle, every member capped at the size its bundle.json declares."""

    def declared(data: bytes) -> dict[str, int]:
        where = f"{BUNDLE_MANIFEST} of {bundle}"
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ArtifactError(f"{where} is not valid JSON ({error}); package it again") from error
        if not isinstance(document, dict):
            raise ArtifactError(f"{where} must hold a JSON object; package it again")
        manifest = BundleManifest.from_json(document, where)
        return {name: record.size for name, record in manifest.files.items()}

    extract_archive(bundle, into, BUNDLE_MANIFEST, declared)


def _existing(bundle: str | Path) -> Path:
    bundle = Path(bundle)
    require_suffix(bundle)
    if not bundle.is_file():
        raise ArtifactError(f"no bundle at {bundle}: the file does not exist")
    return bundle


def _complete(root: Path) -> bool:
    """An earlier unpack that is still whole: every file bundle.json lists, with its content
    (hashed again only where a file changed since its last good check)."""
    try:
        manifest = read_bundle_manifest(root, root)
    except ArtifactError:
        return False
    memory = Remembered.of(root)
    for name, record in manifest.files.items():
        path = root / name
        if not path.is_file() or path.stat().st_size != record.size:
            return False
        if not memory.knows(name, path, record.sha256):
            if sha256_file(path) != record.sha256:
                return False
            memory.learn(name, path, record.sha256)
    memory.save()
    return True
