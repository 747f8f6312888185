"""The two bundle archive formats: reproducible atomic writing, and reading that trusts nothing.

Members are written in the order given with fixed metadata, so the same files always pack to
the same bytes (and so to the same cache key). Reading refuses absolute paths, '..', links
and duplicate members before anything is written.
"""

from __future__ import annotations

import gzip
import io
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from modelkiln.errors import ArtifactError, IntegrityError, UnsupportedError
from modelkiln.outputs import atomic_file

SUFFIXES = (".tar.gz", ".zip")
# 1980-01-01, the earliest time a zip can record; the tar members carry it too.
_EPOCH = 315532800
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Model weights barely compress: a faster level loses almost nothing.
_GZIP_LEVEL = 6
_CHUNK = 1 << 20


def archive_suffix(path: Path) -> str | None:
    """'.tar.gz' or '.zip' when path names a bundle file, else None."""
    return next((suffix for suffix in SUFFIXES if path.name.endswith(suffix)), None)


def is_bundle(path: str | Path) -> bool:
    """Whether path is meant as a bundle: a bundle suffix, and not a directory."""
    path = Path(path)
    return archive_suffix(path) is not None and not path.is_dir()


def require_suffix(path: Path) -> str:
    suffix = archive_suffix(path)
    if suffix is None:
        raise UnsupportedError(
            f"bundle {path} must end in {' or '.join(SUFFIXES)}; got '{''.join(path.suffixes)}'"
        )
    return suffix


def write_archive(output: Path, members: Sequence[tuple[str, Path]]) -> None:
    """Write members (name in the archive, file) to output; output changes only when complete.

    The archive is written beside output and renamed over it: a failure or interrupt
    leaves any previous bundle as it was.
    """
    suffix = require_suffix(output)
    if output.is_dir():
        raise ArtifactError(f"bundle {output} is a directory; choose another -o")
    with atomic_file(output) as partial, partial.open("wb") as raw:
        if suffix == ".zip":
            _write_zip(raw, members)
        else:
            _write_tar_gz(raw, members)


def _write_tar_gz(raw: IO[bytes], members: Sequence[tuple[str, Path]]) -> None:
    # filename="" and mtime=0 keep the temporary name and the time out of the gzip header.
    with (
        gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=_GZIP_LEVEL
        ) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for name, path in members:
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mtime = _EPOCH
            info.mode = 0o644
            with path.open("rb") as source:
                archive.addfile(info, source)


def _write_zip(raw: IO[bytes], members: Sequence[tuple[str, Path]]) -> None:
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, path in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            # Known up front, so that zipfile switches to zip64 for members over 2 GiB.
            info.file_size = path.stat().st_size
            with path.open("rb") as source, archive.open(info, "w") as target:
                shutil.copyfileobj(source, target, _CHUNK)


# The index (bundle.json) is read whole before anything is written: at most this much.
INDEX_LIMIT = 16 << 20
# Members' sizes by name, from the index's bytes (raises ArtifactError when it is unreadable).
Declared = Callable[[bytes], Mapping[str, int]]


def extract_archive(bundle: Path, into: Path, index: str, declared: Declared) -> None:
    """Unpack every member of bundle under the existing directory into; trust no name and no
    size. The member `index` comes first and `declared(its bytes)` says every other member's
    size: a member it does not list, or of another size, is refused before more than its
    declared bytes are written, so a small archive cannot fill the disk."""
    suffix = require_suffix(bundle)
    if not bundle.is_file():
        raise ArtifactError(f"no bundle at {bundle}: the file does not exist")
    try:
        if suffix == ".zip":
            _extract_zip(bundle, into, index, declared)
        else:
            _extract_tar_gz(bundle, into, index, declared)
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ArtifactError(
            f"bundle {bundle} is not a readable {suffix} archive ({error}); package it again"
        ) from error


class _Sizes:
    """The declared size of every member, from the index; and the room to unpack them."""

    def __init__(self, bundle: Path, into: Path, index: str, data: bytes, declared: Declared):
        self.bundle = bundle
        self.index = index
        self.sizes = {**declared(data), index: len(data)}
        needed, free = sum(self.sizes.values()), shutil.disk_usage(into).free
        if needed > free:
            raise ArtifactError(
                f"bundle {bundle} unpacks to {needed / 1e6:.0f} MB and {into} has "
                f"{free / 1e6:.0f} MB free; free some space, or point MODELKILN_CACHE at a "
                "larger disk"
            )

    def of(self, name: str, size: int) -> int:
        if name not in self.sizes:
            raise IntegrityError(
                f"bundle {self.bundle} failed verification: {name} is not listed in "
                f"{self.index}; package the artifact again (`kiln package`)"
            )
        if size != self.sizes[name]:
            raise IntegrityError(
                f"bundle {self.bundle} failed verification: {name} has {size} bytes, "
                f"{self.index} says {self.sizes[name]}; package the artifact again"
            )
        return size


def _index_bytes(bundle: Path, source: IO[bytes], size: int) -> bytes:
    if size > INDEX_LIMIT:
        raise ArtifactError(f"bundle {bundle}'s index is {size} bytes; package it again")
    return source.read(INDEX_LIMIT + 1)[:size]


def _extract_tar_gz(bundle: Path, into: Path, index: str, declared: Declared) -> None:
    seen: set[str] = set()
    sizes: _Sizes | None = None
    with tarfile.open(bundle, "r:gz") as archive:
        for member in archive:  # in order: one pass over the compressed stream
            name = _safe_name(bundle, member.name)
            if member.isdir():
                (into / name).mkdir(parents=True, exist_ok=True)
                continue
            source = archive.extractfile(member) if member.isfile() else None
            if source is None:
                kind = "link" if member.issym() or member.islnk() else "special file"
                raise ArtifactError(
                    f"bundle {bundle} member '{member.name}' is a {kind}; "
                    "a bundle holds only regular files"
                )
            if sizes is None:
                if name != index:
                    raise ArtifactError(
                        f"{bundle} is not a modelkiln bundle (it does not start with {index}); "
                        "make one with `kiln package ARTIFACT --target TARGET -o BUNDLE`"
                    )
                data = _index_bytes(bundle, source, member.size)
                sizes = _Sizes(bundle, into, index, data, declared)
                source = io.BytesIO(data)
            _extract(bundle, name, source, into, seen, sizes.of(name, member.size))


def _extract_zip(bundle: Path, into: Path, index: str, declared: Declared) -> None:
    seen: set[str] = set()
    with zipfile.ZipFile(bundle) as archive:
        try:
            info = archive.getinfo(index)
        except KeyError:
            raise ArtifactError(
                f"{bundle} is not a modelkiln bundle (no {index}); make one with "
                "`kiln package ARTIFACT --target TARGET -o BUNDLE`"
            ) from None
        with archive.open(info) as source:
            sizes = _Sizes(
                bundle, into, index, _index_bytes(bundle, source, info.file_size), declared
            )
        for info in archive.infolist():
            name = _safe_name(bundle, info.filename)
            if info.is_dir():
                (into / name).mkdir(parents=True, exist_ok=True)
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ArtifactError(
                    f"bundle {bundle} member '{info.filename}' is a link; "
                    "a bundle holds only regular files"
                )
            with archive.open(info) as source:
                _extract(bundle, name, source, into, seen, sizes.of(name, info.file_size))


def _safe_name(bundle: Path, name: str) -> str:
    """The member's path relative to the unpacked root, if it stays inside it."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or PureWindowsPath(name).drive:
        raise ArtifactError(
            f"bundle {bundle} has a member that points outside it: '{name}' (an absolute path "
            "or '..'); refusing to unpack it"
        )
    return path.as_posix()


def _extract(
    bundle: Path, name: str, source: IO[bytes], into: Path, seen: set[str], size: int
) -> None:
    if name == ".":
        raise ArtifactError(f"bundle {bundle} has a file member without a name; package it again")
    if name in seen:
        raise ArtifactError(f"bundle {bundle} has two members named '{name}'; package it again")
    seen.add(name)
    target = into / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("xb") as out:
            written = 0
            # Never more than the declared size: a member whose header lies stops here.
            while chunk := source.read(min(_CHUNK, size - written + 1)):
                written += len(chunk)
                if written > size:
                    raise ArtifactError(
                        f"bundle {bundle} member '{name}' holds more than its declared {size} "
                        "bytes; refusing to unpack it"
                    )
                out.write(chunk)
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as error:
        raise ArtifactError(
            f"bundle {bundle} member '{name}' collides with another member; package it again"
        ) from error
