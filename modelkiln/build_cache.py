"""A content-addressed build cache (`kiln build --cache [DIR|URL]`, `kiln cache`).

A build's key is what decides its files: the source's weights (each file's sha256, LoRAs
fused in), the resolved profile (LoRAs by content and scale, not path), the content of
the data folders it calibrates and validates on, and the versions of modelkiln and of every
library that exports, quantizes or runs. Same key, same artifact: the builder restores it
instead of building. An entry is `<root>/<key>/` holding the artifact's files plus
`entry.json`, written last (an entry without it is half-written and ignored). Entries are
verified by content on the way out (kiln.json's digest and every file's sha256, which the
build recorded from the files it stored): one that does not match is refused, and the build
runs.

The root is a local folder or any fsspec URL (s3://, gs://, memory://, ...), so CI jobs on
different machines share builds; a local root gets hard links where it can.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from modelkiln.artifact import MANIFEST_NAME
from modelkiln.errors import ArtifactError, KilnError, StorageError, first_line

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
    from modelkiln.records import LoraRecord

logger = logging.getLogger(__name__)

KEY_VERSION = 1
ENTRY = "entry.json"
BUILDS = "builds"  # the folder under $MODELKILN_CACHE that --cache alone uses


def build_key(
    weights: Mapping[str, str], profile: Profile, loras: Sequence[LoraRecord] = ()
) -> str:
    """The key of a build: sha256 over its inputs, canonical JSON."""
    from modelkiln import __version__
    from modelkiln.env import library_versions

    settings = profile.to_dict()
    settings.pop("lora", None)  # by content below: a LoRA moved on disk is the same LoRA
    inputs = {
        "key_version": KEY_VERSION,
        "weights": dict(sorted(weights.items())),
        "profile": settings,
        "loras": [(lora.sha256, lora.scale) for lora in loras],
        "data": {
            key: folder_digest(path)
            for key, path in (
                ("calibration", profile.calibration.data),
                ("validation", profile.validation.data),
            )
            if path
        },
        "versions": {"modelkiln": __version__, **library_versions()},
    }
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def folder_digest(location: str) -> str:
    """A data folder (or file) by its files' names, sizes and modification times; a name
    that is not a path (digits) by itself."""
    from modelkiln.integrity import stat_digest

    path = Path(location).expanduser()
    if not path.exists():
        return location
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return stat_digest(path, files)


class UpToDate(Exception):
    """The artifact at a build's output has the build's key: nothing to build or swap in."""


def built_key(artifact: Path) -> str | None:
    """The build key of an intact artifact, or None (none there, broken, built before keys)."""
    from modelkiln.loading import open_artifact

    if not (artifact / MANIFEST_NAME).is_file():
        return None
    try:
        return open_artifact(artifact).manifest.build.key
    except KilnError:
        return None


@dataclass(frozen=True)
class Entry:
    key: str
    created: str
    source: str
    profile: str
    size_bytes: int


class BuildCache:
    """Entries under `location`: a folder, or an fsspec URL."""

    def __init__(self, location: str | Path) -> None:
        try:
            import fsspec
        except ImportError as error:
            from modelkiln.errors import missing_backend

            raise missing_backend("fsspec", "build") from error
        self.location = str(location)
        # Keys this process restored and stored: what `kiln build` reports.
        self.restored: list[str] = []
        self.stored: list[str] = []
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.location)
        except (ValueError, ImportError) as error:  # unknown protocol, its package missing
            raise StorageError(
                f"cannot open the build cache {self.location}: {first_line(error)}"
            ) from error
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def has(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key, ENTRY)))

    def restore(self, key: str, staging: Path) -> Entry | None:
        """The entry's artifact copied (or linked) into the empty `staging` and verified; None
        when there is none or it is refused (then staging is empty again)."""
        try:
            if not self.has(key):
                return None
            entry = self._entry(key)
            self._download(key, staging)
            _verify(staging)
        except Exception as error:  # any store's errors (botocore, gcsfs, ...): build instead
            logger.warning("build cache entry %s refused (%s); building", key, first_line(error))
            _empty(staging)
            return None
        self.restored.append(key)
        return entry

    def store(self, key: str, artifact: Path) -> None:
        """The built (and verified) artifact as entry `key`; entry.json last. A store that
        fails (a full disk, a remote's permissions) costs the entry, not the build."""
        try:
            self._store(key, artifact)
        except Exception as error:  # any store's errors: the artifact itself is fine
            logger.warning("could not store %s in the build cache (%s)", key, first_line(error))

    def _store(self, key: str, artifact: Path) -> None:
        from modelkiln.artifact import read_manifest

        # Its kiln.json was written from these very files: checked again on the way out.
        manifest = read_manifest(artifact)
        target = self._path(key)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        for file in sorted(p for p in artifact.rglob("*") if p.is_file()):
            remote = self._path(key, file.relative_to(artifact).as_posix())
            self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            if self.local and _link(file, Path(remote)):
                continue
            self.fs.put_file(str(file), remote)
        entry = {
            "key": key,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": manifest.source.name,
            "profile": manifest.profile.name,
            "size_bytes": manifest.size_bytes,
        }
        self.fs.pipe_file(self._path(key, ENTRY), json.dumps(entry, indent=2).encode())
        self.stored.append(key)

    def entries(self) -> list[Entry]:
        if not self.fs.exists(self.root):
            return []
        found = []
        for folder in sorted(self.fs.ls(self.root, detail=False)):
            key = str(folder).rstrip("/").rsplit("/", 1)[-1]
            if self.fs.exists(self._path(key, ENTRY)):
                found.append(self._entry(key))
        return found

    def remove(self, key: str) -> None:
        self.fs.rm(self._path(key), recursive=True)

    def _entry(self, key: str) -> Entry:
        try:
            data = json.loads(self.fs.cat_file(self._path(key, ENTRY)))
            return Entry(
                key, data["created"], data["source"], data["profile"], int(data["size_bytes"])
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ArtifactError(
                f"build cache entry {self._path(key)} has a broken {ENTRY}: remove it "
                "(kiln cache prune --all)"
            ) from error

    def _download(self, key: str, staging: Path) -> None:
        prefix = self._path(key) + "/"
        for remote in self.fs.find(self._path(key)):
            if not str(remote).startswith(prefix):
                raise ArtifactError(f"build cache entry {key} lists {remote}, outside it")
            relative = str(remote)[len(prefix) :]
            if relative == ENTRY:
                continue
            local = staging / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            if self.local and _link(Path(remote), local):
                continue
            self.fs.get_file(remote, str(local))


def _link(source: Path, target: Path) -> bool:
    """A hard link on one file system (no copy of gigabytes); False where it cannot."""
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def _verify(root: Path) -> None:
    """kiln.json's own digest and every file's sha256, as loading checks them."""
    from modelkiln.artifact import check_intact, read_manifest

    manifest = read_manifest(root)
    check_intact(root, manifest, hashes=True, remembered=False)


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def open_cache(location: str | None) -> BuildCache | None:
    """--cache's value: None (no cache), "" ($MODELKILN_CACHE/builds) or a folder / URL."""
    if location is None:
        return None
    if location == "":
        from modelkiln.env import cache_home

        return BuildCache(cache_home() / BUILDS)
    return BuildCache(location)
