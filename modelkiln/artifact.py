"""The artifact directory: reading and writing kiln.json (records.py is its codec), file
hashes and the checks that its files are intact (outputs.py commits it atomically).

Everything here is torch-free: loading an artifact reads the manifest and checks its files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from modelkiln.errors import ArtifactError
from modelkiln.jsonfile import read_json_object
from modelkiln.outputs import RETIRED, leftovers
from modelkiln.records import FileRecord, Manifest

MANIFEST_NAME = "kiln.json"
_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_files(root: Path) -> dict[str, FileRecord]:
    """Size and sha256 of every file under root except the manifest itself."""
    records = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative != MANIFEST_NAME:
            records[relative] = FileRecord(path.stat().st_size, sha256_file(path))
    return records


def write_manifest(root: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=False)
    (root / MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")


def read_manifest(root: Path) -> Manifest:
    root = Path(root)
    if not root.exists():
        if leftovers(root.absolute(), RETIRED):
            raise ArtifactError(
                f"no artifact at {root}: an interrupted build moved it aside; "
                f"`kiln clean {root.parent}` puts it back"
            )
        raise ArtifactError(f"no artifact at {root}: the directory does not exist")
    if not root.is_dir():
        raise ArtifactError(f"{root} is a file, not an artifact directory")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{root} is not a modelkiln artifact (no {MANIFEST_NAME}); "
            "build one with `kiln build SOURCE --profile PROFILE -o DIR`"
        )
    data = read_json_object(path, ArtifactError, fix="; rebuild the artifact")
    return Manifest.from_json(data, path)


def find_problems(
    root: Path, manifest: Manifest, *, hashes: bool, remembered: bool = False
) -> list[str]:
    """Missing files, files reached through links out of the artifact, size mismatches and
    (with hashes) content changes; empty when intact. `remembered`: a file whose inode, mtime
    and size are those of its last good hash is not hashed again (integrity.py)."""
    from modelkiln.integrity import Remembered

    memory = Remembered.of(root) if hashes and remembered else None
    problems = []
    real_root = root.resolve()
    entries = {record.entry for record in manifest.components.values()}
    for relative in sorted(set(manifest.files) | entries):
        if not (root / relative).resolve().is_relative_to(real_root):
            problems.append(f"{relative} leads outside the artifact (a link)")
    for relative, record in manifest.files.items():
        path = root / relative
        if not path.is_file():
            problems.append(f"{relative} is missing")
        elif path.stat().st_size != record.size:
            problems.append(
                f"{relative} has {path.stat().st_size} bytes, the manifest says {record.size}"
            )
        elif hashes and not _same_content(path, relative, record.sha256, memory):
            problems.append(f"{relative} has changed (sha256 differs from the manifest)")
    if memory is not None:
        memory.save()
    return problems


def _same_content(path: Path, relative: str, sha256: str, memory: Any) -> bool:
    if memory is not None and memory.knows(relative, path, sha256):
        return True
    same = sha256_file(path) == sha256
    if same and memory is not None:
        memory.learn(relative, path, sha256)
    return same


def check_intact(
    root: Path, manifest: Manifest, *, hashes: bool = False, remembered: bool = False
) -> None:
    problems = find_problems(root, manifest, hashes=hashes, remembered=remembered)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArtifactError(
            f"artifact {root} is incomplete or corrupted: {problems[0]}{more}; "
            "rebuild it (`kiln verify` lists every problem)"
        )
