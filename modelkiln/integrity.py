"""What this machine last found intact: loading verifies every file's content by default, and
hashes a file again only when its inode, modification time or size changed since.

One small JSON file per artifact directory under ``$MODELKILN_CACHE/verified`` maps each
file to (inode, mtime in ns, size, sha256) as of its last good hash. The first load of a large
artifact hashes it once (SD-1.5: ~4 GB); later loads stat its files. A cache that cannot be
read or written only means hashing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from modelkiln.outputs import write_file_atomic

logger = logging.getLogger(__name__)

Fingerprint = list[int | str]  # inode, mtime_ns, size, sha256


def stat_digest(root: Path, files: Iterable[Path], *extra: str) -> str:
    """A cache key from files as they are (name under root, size, mtime) without reading them:
    hashing gigabytes for a key would cost more than the cache saves. `extra` is appended."""
    listing = []
    for file in sorted(files):
        stat = file.stat()
        name = file.relative_to(root).as_posix() if file != root else file.name
        listing.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join([*listing, *extra]).encode()).hexdigest()


class Remembered:
    def __init__(self, path: Path, known: dict[str, Fingerprint]) -> None:
        self.path = path
        self.known = known
        self.changed = False

    @classmethod
    def of(cls, root: Path) -> Remembered:
        from modelkiln.env import cache_home

        key = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:32]
        path = cache_home() / "verified" / f"{key}.json"
        try:
            known = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = {}
        return cls(path, known if isinstance(known, dict) else {})

    def knows(self, relative: str, file: Path, sha256: str) -> bool:
        """`file` is as it was when it last hashed to `sha256`."""
        return self.known.get(relative) == _fingerprint(file, sha256)

    def learn(self, relative: str, file: Path, sha256: str) -> None:
        self.known[relative] = _fingerprint(file, sha256)
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        try:
            write_file_atomic(self.path, json.dumps(self.known).encode("utf-8"))
        except OSError as error:  # a read-only cache: verification just runs again next time
            logger.debug("cannot remember verified files in %s: %s", self.path, error)


def _fingerprint(file: Path, sha256: str) -> Fingerprint:
    stat = file.stat()
    return [stat.st_ino, stat.st_mtime_ns, stat.st_size, sha256]
