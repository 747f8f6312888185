"""What a build or a measurement asks a cluster for, and whether any node can give it.

A build asks for `build_cpus` CPUs, the memory its largest component needs (that component's
checkpoints in fp32 plus the builder's own overhead, as memory_budget counts them), and the
resources its backends' workers need (TensorRT: a GPU) or that the matrix's [ray.resources]
adds per format (Core ML: a node started with `--resources '{"macos": 1}'` takes its
validations). A measurement takes every CPU of one node, so that no two benchmarks, and no
build, share a node while it times.

Ray leaves a task that no node can run pending forever: a request is checked against the
nodes before it is submitted, and refused with what it asked for and what the largest node has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelkiln.errors import ClusterError, ReportError, check_known_keys

GB = 1e9
# Ray's names for the resources we request (`ray.nodes()[i]["Resources"]`).
CPU = "CPU"
GPU = "GPU"
MEMORY = "memory"
DEFAULT_BUILD_CPUS = 2
DEFAULT_TIMEOUT_S = 6 * 3600.0  # a phase (builds, references, measurements) of a matrix
SETTINGS_KEYS = {"build_cpus", "timeout_s", "resources"}


@dataclass(frozen=True)
class ClusterSettings:
    """The matrix file's [ray] table (every key optional)."""

    build_cpus: int = DEFAULT_BUILD_CPUS
    timeout_s: float = DEFAULT_TIMEOUT_S
    # format or runtime name -> extra Ray resources its tasks need, e.g. coreml = {macos = 1}
    resources: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str) -> ClusterSettings:
        check_known_keys(table, SETTINGS_KEYS, where)
        cpus = table.get("build_cpus", DEFAULT_BUILD_CPUS)
        timeout = table.get("timeout_s", DEFAULT_TIMEOUT_S)
        resources = table.get("resources", {})
        if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1:
            raise ReportError(f"{where} build_cpus must be a positive integer, got {cpus!r}")
        if not _positive(timeout):
            raise ReportError(f"{where} timeout_s must be a positive number, got {timeout!r}")
        shape = (
            f"{where} resources must map a format or runtime to a table of positive amounts, "
            f"e.g. resources.coreml = {{ macos = 1 }}; got {resources!r}"
        )
        if not isinstance(resources, dict):
            raise ReportError(shape)
        checked: dict[str, dict[str, float]] = {}
        for name, wanted in resources.items():
            if not isinstance(wanted, dict) or not all(_positive(v) for v in wanted.values()):
                raise ReportError(shape)
            checked[name] = {key: float(value) for key, value in wanted.items()}
        return cls(cpus, float(timeout), checked)


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class Request:
    """One task's resources in Ray's terms."""

    cpus: float
    memory_bytes: int = 0
    custom: Mapping[str, float] = field(default_factory=dict)  # GPU and named resources

    def as_resources(self) -> dict[str, float]:
        wanted = {CPU: self.cpus, **self.custom}
        if self.memory_bytes:
            wanted[MEMORY] = float(self.memory_bytes)
        return wanted

    def describe(self) -> str:
        return describe(self.as_resources())


def describe(resources: Mapping[str, float]) -> str:
    parts = []
    for name, amount in sorted(resources.items()):
        if name.startswith("node:") or name == "object_store_memory":
            continue
        shown = f"{amount / GB:.1f} GB" if name == MEMORY else f"{amount:g}"
        parts.append(f"{name} {shown}")
    return ", ".join(parts) or "nothing"


def backend_resources(names: Iterable[str], settings: ClusterSettings) -> dict[str, float]:
    """What workers of these backends / formats need: the backends' own worker_resources
    (TensorRT: a GPU) and the matrix's [ray.resources] for them, the larger amount of each."""
    from modelkiln.backends import format_owner, runtime_backend
    from modelkiln.errors import KilnError

    needed: dict[str, float] = {}
    for name in names:
        declared: Mapping[str, float] = {}
        for lookup in (format_owner, runtime_backend):
            try:
                declared = lookup(name).worker_resources
                break
            except KilnError:
                continue
        for source in (declared, settings.resources.get(name, {})):
            for key, amount in source.items():
                needed[key] = max(needed.get(key, 0.0), amount)
    return needed


def checkpoint_memory(source_dir: Path) -> int:
    """What validating the largest component holds: the safetensors of one folder (a
    component, or a one-model source) in fp32, plus the builder's overhead."""
    from modelkiln.memory_budget import OVERHEAD_BYTES, fp32_bytes

    by_folder: dict[Path, list[Path]] = {}
    for file in source_dir.rglob("*.safetensors"):
        by_folder.setdefault(file.parent, []).append(file)
    largest = max((fp32_bytes(files) for files in by_folder.values()), default=0)
    return largest + OVERHEAD_BYTES


def nodes_that_fit(request: Request, nodes: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The alive nodes whose total resources hold the request."""
    wanted = request.as_resources()
    return [
        dict(node)
        for node in nodes
        if node.get("Alive")
        and all(
            node.get("Resources", {}).get(name, 0.0) >= amount for name, amount in wanted.items()
        )
    ]


def require_fit(
    request: Request, nodes: Sequence[Mapping[str, Any]], what: str, address: str
) -> list[dict[str, Any]]:
    """The nodes that can run `what`; a one-line error when none can (Ray would wait forever)."""
    fitting = nodes_that_fit(request, nodes)
    if fitting:
        return fitting
    alive = [node for node in nodes if node.get("Alive")]
    largest = (
        max(
            alive, key=lambda node: tuple(node["Resources"].get(k, 0.0) for k in (GPU, CPU, MEMORY))
        )
        if alive
        else None
    )
    has = describe(largest["Resources"]) if largest else "no alive node"
    raise ClusterError(
        f"{what} needs {request.describe()}, and no node of the Ray cluster at {address} has "
        f"that (the largest has {has}): add such a node (`ray start --resources=...` for a "
        "named resource), or ask for less ([ray] build_cpus, the profile's build.max_memory_gb)"
    )


__all__ = [
    "ClusterSettings",
    "Request",
    "backend_resources",
    "checkpoint_memory",
    "nodes_that_fit",
    "require_fit",
]
