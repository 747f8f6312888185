"""`--executor ray`: a matrix's builds, torch references and measurements as Ray tasks.

Each task runs in a worker process of its own (max_calls=1: the memory of one build is gone
before the next), asks for what cluster/resources.py says, and reports a KilnError back as
the same class. Builds run side by side as the cluster's CPUs and memory allow; a measurement
holds a whole node (all of its CPUs, pinned there), so no benchmark shares a machine.

Artifacts move through what every node can reach: the matrix's output folder when it is on a
shared file system (a single machine's cluster, NFS), or the build cache (`--cache URL`, any
fsspec store), from which the driver and the measuring nodes restore an artifact by its key,
verified by content. A node that can reach neither is told so in one line.

The workers import modelkiln: every node of the cluster needs it installed, with the extras
of the backends it builds or runs, as the driver has them.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from modelkiln import errors
from modelkiln.artifact import MANIFEST_NAME
from modelkiln.cluster.resources import (
    CPU,
    GPU,
    ClusterSettings,
    Request,
    backend_resources,
    checkpoint_memory,
    require_fit,
)
from modelkiln.errors import ClusterError, KilnError, first_line
from modelkiln.progress import NullProgress, Progress

if TYPE_CHECKING:
    from modelkiln.bench.matrix import BuildJob
    from modelkiln.bench.settings import BenchSettings
    from modelkiln.build_cache import BuildCache
    from modelkiln.loading import Artifact

logger = logging.getLogger(__name__)

ADDRESS_TIMEOUT_S = 5.0  # Ray retries an unreachable address for minutes: we look first
DEFAULT_PORT = {"ray://": 10001, "": 6379}  # Ray Client's port, the GCS's
T = TypeVar("T")


class RayExecutor:
    """A Ray cluster: one at `address` ("auto": the one this machine belongs to), or a new
    one on this machine when address is None. Use as a context manager."""

    def __init__(
        self,
        address: str | None,
        settings: ClusterSettings | None = None,
        cache: BuildCache | None = None,
    ) -> None:
        self.address = address
        self.cache = cache  # where measuring nodes restore artifacts they do not share
        self.shown = address or "this machine"
        self.settings = settings or ClusterSettings()
        self._started = False
        self.nodes: list[dict[str, Any]] = []

    def __enter__(self) -> RayExecutor:
        ray = _ray()
        if self.address not in (None, "auto"):
            check_reachable(self.address)
        if ray.is_initialized():  # a caller's own cluster (tests, notebooks): used as it is
            self.nodes = _alive(ray.nodes())
            return self
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if self.address is None:
            options["include_dashboard"] = False
        try:
            ray.init(address=self.address, **options)
        except (ConnectionError, RuntimeError, ValueError, OSError) as error:
            raise ClusterError(
                f"cannot connect to a Ray cluster at {self.shown}: "
                f"{first_line(error).rstrip('.')}; start "
                "one (`ray start --head`) or leave --address out to run one on this machine"
            ) from error
        self._started = True
        self.nodes = _alive(ray.nodes())
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._started:
            _ray().shutdown()
            self._started = False

    # --- builds -------------------------------------------------------------------------

    def build(
        self, jobs: Sequence[BuildJob], progress: Progress, cache: BuildCache | None
    ) -> list[Path]:
        ray = _ray()
        task = ray.remote(max_calls=1)(_build_task)
        location = cache.location if cache is not None else None
        submitted = {}
        for index, job in enumerate(jobs):
            request = self._build_request(job)
            require_fit(request, self.nodes, f"building {job.label}", self.shown)
            ref = task.options(**_options(request)).remote(
                job.source, job.profile.to_dict(), str(job.target), location
            )
            submitted[ref] = index
        results = self._gather(submitted, "builds", progress, lambda index: jobs[index].label)
        return [self._here(job, results[index], cache) for index, job in enumerate(jobs)]

    def _build_request(self, job: BuildJob) -> Request:
        from modelkiln.backends import resolved_runtime
        from modelkiln.memory_budget import GB

        profile = job.profile
        custom = backend_resources(
            (profile.export.format, resolved_runtime(profile)), self.settings
        )
        limit = profile.build.max_memory_gb
        memory = int(limit * GB) if limit is not None else checkpoint_memory(job.source_dir)
        return Request(float(self.settings.build_cpus), memory, custom)

    def _here(self, job: BuildJob, result: Mapping[str, Any], cache: BuildCache | None) -> Path:
        """The job's artifact at its target on this machine: built there (a shared folder), or
        restored from the build cache by the key the node built."""
        from modelkiln.build_cache import built_key
        from modelkiln.outputs import atomic_directory

        key = result["key"]
        if built_key(job.target) == key:
            return job.target
        if cache is None:
            raise ClusterError(
                f"{job.label} was built on {result['node']}, and {job.target} is not that "
                "artifact on this machine: put the matrix's [build] output on a file system "
                "every node shares, or give --cache URL (a store every node reaches)"
            )
        with atomic_directory(job.target, marker=MANIFEST_NAME) as staging:
            if cache.restore(key, staging) is None:
                raise ClusterError(
                    f"{job.label} was built on {result['node']} with key {key}, which the "
                    f"build cache {cache.location} does not hold intact: check that every "
                    "node can write to it"
                )
        return job.target

    # --- benchmarks (bench.harness.Executor) --------------------------------------------

    def references(
        self,
        wanted: dict[str, Artifact],
        settings: BenchSettings,
        scratch: Path,
        progress: Progress,
    ) -> dict[str, Path]:
        ray = _ray()
        task = ray.remote(max_calls=1)(_reference_task)
        request = Request(float(self.settings.build_cpus))
        submitted = {}
        for key, artifact in wanted.items():
            require_fit(request, self.nodes, f"the torch reference of {key}", self.shown)
            where = self._whereabouts(artifact)
            submitted[task.options(**_options(request)).remote(where, settings.to_json())] = key
        results = self._gather(submitted, "torch references", progress, str)
        folders = {}
        for key, result in results.items():
            folders[key] = scratch / "references" / key
            _unpack(result["files"], folders[key])
        return folders

    def measure(
        self,
        work: Sequence[tuple[Artifact, Path | None]],
        settings: BenchSettings,
        scratch: Path,
        progress: Progress,
    ) -> list[dict[str, Any]]:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = _ray()
        task = ray.remote(max_calls=1)(_measure_task)
        shared: dict[Path, Any] = {}  # each reference is sent to the object store once
        submitted = {}
        for index, (artifact, reference) in enumerate(work):
            manifest = artifact.manifest
            custom = backend_resources(
                (manifest.format, settings.runtime or manifest.runtime), self.settings
            )
            fitting = require_fit(
                Request(1.0, 0, custom), self.nodes, f"measuring {artifact.root}", self.shown
            )
            node = fitting[index % len(fitting)]  # round robin over the nodes that can
            whole = Request(node["Resources"][CPU], 0, custom)  # every CPU: the node is ours
            options = _options(whole) | {
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            }
            if reference is not None and reference not in shared:
                shared[reference] = ray.put(_pack(reference))
            files = shared.get(reference) if reference is not None else None
            ref = task.options(**options).remote(
                self._whereabouts(artifact), settings.to_json(), files
            )
            submitted[ref] = index
        label: Callable[[int], str] = lambda index: str(work[index][0].root)  # noqa: E731
        results = self._gather(submitted, "measurements", progress, label)
        return [entry for index in range(len(work)) for entry in results[index]["entries"]]

    def _whereabouts(self, artifact: Artifact) -> dict[str, str | None]:
        """How a node finds the artifact: its path here and kiln.json's digest (the same
        artifact there too?), else its build key in the build cache."""
        root = artifact.root.absolute()
        digest = hashlib.sha256((root / MANIFEST_NAME).read_bytes()).hexdigest()
        return {
            "root": str(root),
            "manifest_sha256": digest,
            "key": artifact.manifest.build.key,
            "cache": self.cache.location if self.cache is not None else None,
        }

    # --- waiting ------------------------------------------------------------------------

    def _gather(
        self,
        submitted: Mapping[Any, T],
        what: str,
        progress: Progress,
        label: Callable[[T], str],
    ) -> dict[T, dict[str, Any]]:
        """Every task's result as it finishes; a failure or the timeout cancels the rest."""
        ray = _ray()
        from ray.exceptions import RayError

        pending = list(submitted)
        results: dict[T, dict[str, Any]] = {}
        deadline = time.monotonic() + self.settings.timeout_s
        with progress.task(f"{what} on the Ray cluster ({self.shown})", total=len(pending)) as step:
            while pending:
                remaining = deadline - time.monotonic()
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(remaining, 0))
                if not ready:
                    _cancel(ray, pending)
                    late = ", ".join(label(submitted[ref]) for ref in pending[:3])
                    raise ClusterError(
                        f"{len(pending)} of {len(submitted)} {what} did not finish within "
                        f"{self.settings.timeout_s:g} s on the Ray cluster at {self.shown} "
                        f"({late}{', ...' if len(pending) > 3 else ''}): check `ray status` "
                        "for pending tasks, or raise [ray] timeout_s in the matrix file"
                    )
                item = submitted[ready[0]]
                try:
                    result = ray.get(ready[0])
                except RayError as error:
                    _cancel(ray, pending)
                    raise ClusterError(
                        f"{label(item)}: the Ray task failed: {first_line(error)}"
                    ) from error
                if "error" in result:
                    _cancel(ray, pending)
                    where = f"{label(item)} (on {result['node']}): "
                    raise errors.from_record(result["error"], where)
                results[item] = result
                step(1)
        return results


def check_reachable(address: str) -> None:
    """A TCP connection to the address first: Ray itself retries a wrong one for minutes."""
    scheme = "ray://" if address.startswith("ray://") else ""
    target = address.removeprefix(scheme)
    host, colon, port = target.rpartition(":")
    if not colon:
        host, port = target, str(DEFAULT_PORT[scheme])
    if not host or not port.isdigit():
        raise ClusterError(
            f"--address {address}: give HOST:PORT (e.g. 10.0.0.5:6379, or ray://HOST:10001 for "
            "Ray Client), or auto for the cluster this machine belongs to"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_S):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ClusterError(
            f"cannot reach a Ray cluster at {address} ({reason.lower()} within "
            f"{ADDRESS_TIMEOUT_S:g} s): start one there (`ray start --head --port {port}`), "
            "check the address, or leave --address out to run one on this machine"
        ) from error


def _ray() -> Any:
    try:
        import ray
    except ImportError as error:
        raise errors.missing_backend("ray", "ray") from error
    return ray


def _alive(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [node for node in nodes if node.get("Alive")]


def _options(request: Request) -> dict[str, Any]:
    """Ray's task options for a request: GPUs and memory have their own keywords."""
    custom = dict(request.custom)
    options: dict[str, Any] = {"num_cpus": request.cpus, "num_gpus": custom.pop(GPU, 0)}
    if request.memory_bytes:
        options["memory"] = request.memory_bytes
    if custom:
        options["resources"] = custom
    return options


def _cancel(ray: Any, pending: list[Any]) -> None:
    for ref in pending:
        ray.cancel(ref, force=True)


# --- what travels: an artifact's whereabouts, a reference folder's files ---------------------


def _pack(folder: Path) -> dict[str, bytes]:
    return {
        file.relative_to(folder).as_posix(): file.read_bytes()
        for file in sorted(folder.rglob("*"))
        if file.is_file()
    }


def _unpack(files: Mapping[str, bytes], folder: Path) -> None:
    for relative, data in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# --- the tasks: they run on the cluster's nodes ----------------------------------------------


def _node() -> str:
    return socket.gethostname()


def _failure(error: KilnError) -> dict[str, Any]:
    return {"error": errors.error_record(error), "node": _node()}


def _build_task(
    source: str, profile_data: dict[str, Any], target: str, cache_location: str | None
) -> dict[str, Any]:
    from modelkiln.build_cache import BuildCache, built_key
    from modelkiln.builder import build
    from modelkiln.profiles import Profile

    try:
        profile = Profile.from_dict(profile_data, origin=f"profile '{profile_data.get('name')}'")
        cache = BuildCache(cache_location) if cache_location else None
        path = build(source, profile, target, reuse=True, cache=cache)
        return {"key": built_key(path), "node": _node()}
    except KilnError as error:
        return _failure(error)


def _locate(where: Mapping[str, str | None], scratch: Path) -> Path:
    """The artifact on this node: at the same path with the same kiln.json, or restored from
    the build cache into scratch."""
    root = Path(str(where["root"]))
    manifest = root / MANIFEST_NAME
    if manifest.is_file() and (
        hashlib.sha256(manifest.read_bytes()).hexdigest() == where["manifest_sha256"]
    ):
        return root
    if where["cache"] and where["key"]:
        from modelkiln.build_cache import BuildCache

        local = scratch / root.name
        local.mkdir(parents=True)
        if BuildCache(str(where["cache"])).restore(str(where["key"]), local) is not None:
            return local
    raise ClusterError(
        f"{root} is not on {_node()} (nor intact in a build cache it can reach): keep "
        "artifacts on a file system every node shares, or give --cache URL"
    )


def _reference_task(where: Mapping[str, str | None], settings_json: str) -> dict[str, Any]:
    from modelkiln.bench.harness import compute_reference
    from modelkiln.bench.settings import BenchSettings
    from modelkiln.loading import open_artifact

    try:
        settings = BenchSettings.from_json(settings_json)
        with tempfile.TemporaryDirectory(prefix="kiln-ray-") as scratch:
            root = _locate(where, Path(scratch))
            folder = Path(scratch) / "reference"
            artifact = open_artifact(root)
            compute_reference(artifact, settings, folder, Path(scratch), NullProgress())
            return {"files": _pack(folder), "node": _node()}
    except KilnError as error:
        return _failure(error)


def _measure_task(
    where: Mapping[str, str | None], settings_json: str, reference: Mapping[str, bytes] | None
) -> dict[str, Any]:
    from modelkiln.bench.harness import measure_one
    from modelkiln.bench.settings import BenchSettings
    from modelkiln.env import cpu_info

    try:
        settings = BenchSettings.from_json(settings_json)
        with tempfile.TemporaryDirectory(prefix="kiln-ray-") as scratch:
            root = _locate(where, Path(scratch))
            folder = None
            if reference is not None:
                folder = Path(scratch) / "reference"
                _unpack(reference, folder)
            entries = measure_one(root, settings, folder, Path(scratch), NullProgress())
    except KilnError as error:
        return _failure(error)
    node = {"hostname": _node(), "cpu": cpu_info()["model"]}
    original = Path(str(where["root"]))
    for entry in entries:  # named as on the driver, not by a node's scratch folder
        entry.update(artifact=str(original), name=original.name, node=node)
    return {"entries": entries, "node": _node()}


__all__ = ["RayExecutor", "check_reachable"]
