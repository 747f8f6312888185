"""`--executor local|ray`: the executor a command's builds and measurements run on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from modelkiln.cluster.resources import ClusterSettings
from modelkiln.errors import InputError

if TYPE_CHECKING:
    from modelkiln.bench.harness import Executor
    from modelkiln.build_cache import BuildCache

EXECUTORS = ("local", "ray")


@contextlib.contextmanager
def open_executor(
    name: str,
    address: str | None = None,
    settings: ClusterSettings | None = None,
    cache: BuildCache | None = None,
) -> Iterator[Executor]:
    """Local execution needs nothing; Ray connects (or starts a cluster here) and shuts down
    what it started when the block ends. RAY_ADDRESS stands in for --address, as in Ray."""
    if name == "local":
        if address:
            raise InputError("--address is for --executor ray; drop it, or add --executor ray")
        from modelkiln.bench.harness import LocalExecutor

        yield LocalExecutor()
        return
    if name != "ray":
        raise InputError(f"unknown executor '{name}'; choose one of {', '.join(EXECUTORS)}")
    from modelkiln.cluster.ray_executor import RayExecutor

    with RayExecutor(address or os.environ.get("RAY_ADDRESS"), settings, cache) as executor:
        yield executor


__all__ = ["EXECUTORS", "open_executor"]
