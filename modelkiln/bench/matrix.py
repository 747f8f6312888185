"""`kiln bench --matrix MATRIX.toml`: build (when needed) and benchmark sources × profiles.

    schema_version = 1
    sources = ["models/my-vit", "google/vit-base-patch16-224"]   # paths relative to this file
    profiles = ["vit-onnxruntime-fp32", "vit-openvino-int8", "my-profile.toml"]

    [build]                         # optional
    output = "artifacts"            # where artifacts go: OUTPUT/<source name>/<profile name>
    set = ["runtime.threads=2"]     # --set overrides for every build
    [build.vit]                     # ... and for one family's builds (vit, sd, sdxl)
    set = ['calibration.data="calibration-images"']

    [bench]                         # optional: any kiln bench option; the command line wins
    batch_sizes = [1, 8]
    runs = 20
    isolate = true
    data = "digits"

    [ray]                           # optional: --executor ray (cluster/resources.py)
    build_cpus = 4                  # CPUs per build task
    timeout_s = 7200                # per phase: builds, references, measurements
    resources.coreml = { macos = 1 } # extra Ray resources for a format's or runtime's tasks

Each source is paired with the profiles of its own model family, so one matrix can hold ViT
and Stable Diffusion sources side by side. An artifact is rebuilt only when its build key
changed (build_cache.build_key: weights, resolved profile, data, library versions). Every
path in the file (sources, profiles, [bench] data and reference, and the data folders of
`set` overrides) is relative to the file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.cluster.resources import ClusterSettings
from modelkiln.errors import ReportError, check_known_keys
from modelkiln.progress import NullProgress, Progress

if TYPE_CHECKING:
    from modelkiln.build_cache import BuildCache
    from modelkiln.profiles import Profile

SCHEMA_VERSION = 1
TOP_KEYS = {"schema_version", "sources", "profiles", "build", "bench", "ray"}
BUILD_KEYS = {"output", "set"}


@dataclass(frozen=True)
class Matrix:
    sources: tuple[str, ...]
    profiles: tuple[str, ...]
    output: Path
    overrides: tuple[str, ...]
    family_overrides: Mapping[str, tuple[str, ...]]  # family name -> its builds' --set
    bench: Mapping[str, Any]  # BenchSettings fields
    cluster: ClusterSettings = field(default_factory=ClusterSettings)  # [ray]

    def overrides_for(self, family: str) -> tuple[str, ...]:
        return (*self.overrides, *self.family_overrides.get(family, ()))


def read_matrix(path: str | Path) -> Matrix:
    from modelkiln.bench.settings import BenchSettings

    path = Path(path).absolute()  # sources and data resolve the same on every node
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ReportError(f"no matrix file at {path}") from error
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ReportError(f"cannot read the matrix {path}: {error}") from error
    where = str(path)
    check_known_keys(data, TOP_KEYS, where)
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ReportError(f"{where}: schema_version must be {SCHEMA_VERSION}")
    base = path.parent
    sources = tuple(_relative(base, item) for item in _strings(data, "sources", where))
    profiles = tuple(_relative(base, item) for item in _strings(data, "profiles", where))
    build = data.get("build", {})
    bench = data.get("bench", {})
    cluster = data.get("ray", {})
    if not all(isinstance(table, dict) for table in (build, bench, cluster)):
        raise ReportError(f"{where}: [build], [bench] and [ray] must be tables")
    from modelkiln.models import FAMILIES

    check_known_keys(build, BUILD_KEYS | set(FAMILIES), f"{where} [build]")
    check_known_keys(bench, {f.name for f in fields(BenchSettings)}, f"{where} [bench]")
    families = {}
    for family in FAMILIES:
        table = build.get(family, {})
        if not isinstance(table, dict):
            raise ReportError(f"{where}: [build.{family}] must be a table")
        check_known_keys(table, {"set"}, f"{where} [build.{family}]")
        families[family] = _overrides(table, f"{where} [build.{family}]", base)
    output = base / str(build.get("output", "artifacts"))
    overrides = _overrides(build, f"{where} [build]", base)
    for key in ("data", "reference"):
        if isinstance(bench.get(key), str):
            bench = {**bench, key: _relative(base, bench[key])}
    settings = ClusterSettings.from_table(cluster, f"{where} [ray]")
    return Matrix(sources, profiles, output, overrides, families, bench, settings)


# `set` overrides whose value is a path: calibration.data, validation.data.
PATH_KEY = re.compile(r"^\s*([\w.]*\.data)\s*=\s*(['\"])(.*)\2\s*$")


def _overrides(table: Mapping[str, Any], where: str, base: Path) -> tuple[str, ...]:
    values = table.get("set", [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ReportError(f"{where} set must be a list of KEY=VALUE strings")
    resolved = []
    for value in values:
        match = PATH_KEY.match(value)
        if match is not None:
            key, _, path = match.groups()
            beside = _relative(base, path)
            value = f"{key}={beside!r}" if beside != path else value
        resolved.append(value)
    return tuple(resolved)


@dataclass(frozen=True)
class BuildJob:
    """One artifact of the matrix: a source built with one of its family's profiles."""

    source: str
    profile: Profile  # overrides applied
    target: Path
    source_dir: Path  # where the source resolved on the machine that planned the job

    @property
    def label(self) -> str:
        return f"{self.source} · {self.profile.name}"


def plan_builds(matrix: Matrix) -> list[BuildJob]:
    """Every (source, profile of its family) pair, in the matrix's order."""
    from modelkiln.models import detect_family
    from modelkiln.plan import load_profile
    from modelkiln.sources import resolve_source

    families = {name: load_profile(name).family for name in matrix.profiles}
    jobs = []
    for source in matrix.sources:
        resolved = resolve_source(source)
        family = detect_family(resolved)
        overrides = matrix.overrides_for(family.name)
        mine = [
            load_profile(name, overrides)
            for name in matrix.profiles
            if families[name] == family.name
        ]
        if not mine:
            raise ReportError(
                f"the matrix has no {family.name} profile for {source}; add one of "
                f"`kiln profiles list`'s {family.name}-* profiles"
            )
        for profile in mine:
            target = matrix.output / _slug(source) / profile.name
            jobs.append(BuildJob(source, profile, target, resolved.local_dir))
    return jobs


def run_build_job(
    job: BuildJob, progress: Progress | None = None, cache: BuildCache | None = None
) -> Path:
    """Build one job's artifact unless the one at its target has the same build key."""
    from modelkiln.builder import build

    progress = progress or NullProgress()
    with progress.task(f"building {job.label} (unless up to date)"):
        return build(
            job.source, job.profile, job.target, progress=progress, reuse=True, cache=cache
        )


def _slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).name or source).strip("-")


def _relative(base: Path, item: str) -> str:
    """A path relative to the matrix file when it exists there; else as given (hub id, name)."""
    candidate = base / item
    return str(candidate) if candidate.exists() else item


def _strings(data: Mapping[str, Any], key: str, where: str) -> list[str]:
    values = data.get(key)
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ReportError(f"{where}: `{key}` must be a non-empty list of strings")
    return values


__all__ = ["BuildJob", "Matrix", "plan_builds", "read_matrix", "run_build_job"]
