"""Edge and mobile bundles: one .tar.gz or .zip holding what one target's runtime needs.

targets.py   which formats each target runs and what it needs installed (the one table)
contents.py  which of an artifact's files a bundle holds
archive.py   reproducible atomic writing and path-safe reading of the two archive formats
manifest.py  bundle.json, and checking an unpacked bundle against it
readme.py    the README.md a bundle carries
pack.py      package(): artifact -> bundle
unpack.py    verify_bundle(), and unpack_bundle() into the cache for load()

Imported lazily, like the package's public API: loading an artifact imports only unpack.py.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SUFFIXES": "archive",
    "is_bundle": "archive",
    "BUNDLE_MANIFEST": "manifest",
    "BundleManifest": "manifest",
    "Bundle": "pack",
    "package": "pack",
    "deployment_targets": "targets",
    "requirements": "targets",
    "artifact_root": "unpack",
    "cache_root": "unpack",
    "unpack_bundle": "unpack",
    "verify_bundle": "unpack",
}

__all__ = [
    "BUNDLE_MANIFEST",
    "SUFFIXES",
    "Bundle",
    "BundleManifest",
    "artifact_root",
    "cache_root",
    "deployment_targets",
    "is_bundle",
    "package",
    "requirements",
    "unpack_bundle",
    "verify_bundle",
]

if TYPE_CHECKING:
    from modelkiln.packaging.archive import SUFFIXES, is_bundle
    from modelkiln.packaging.manifest import BUNDLE_MANIFEST, BundleManifest
    from modelkiln.packaging.pack import Bundle, package
    from modelkiln.packaging.targets import deployment_targets, requirements
    from modelkiln.packaging.unpack import artifact_root, cache_root, unpack_bundle, verify_bundle


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
