"""What this machine offers: library versions, runtimes, CPU features (AMX, AVX-512, ...)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from modelkiln.cpu import cpu_info

# Libraries whose versions go into every manifest and report, besides each backend's own.
LIBRARIES = (
    "modelkiln",
    "numpy",
    "pillow",
    "torch",
    "transformers",
    "timm",
    "diffusers",
    "safetensors",
    "huggingface-hub",
)


def library_versions() -> dict[str, str]:
    from modelkiln.backends import backends

    names = dict.fromkeys([*LIBRARIES, *(lib for b in backends() for lib in b.libraries)])
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def host_info() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_info(),
    }


def machine_report() -> dict[str, Any]:
    """The host and library versions, with a fingerprint of what decides speed.

    Two reports are comparable when their fingerprints match: same CPU model and features,
    same core counts, same architecture (library versions may differ: that is what a
    comparison usually measures).
    """
    host = host_info()
    cpu = host["cpu"]
    basis = [cpu["model"], cpu["features"], cpu["logical_cores"], cpu["usable_cores"]]
    digest = hashlib.sha256(json.dumps([*basis, host["machine"]]).encode()).hexdigest()
    return {"fingerprint": digest[:16], **host, "libraries": library_versions()}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    Linux: VmHWM, the high-water mark of this address space. getrusage's ru_maxrss survives
    exec, so a child started by a large parent would report the parent's peak as its own.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # Unix only; Linux answered above

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes; else KiB


def resident_bytes() -> int:
    """Resident memory of this process now (Linux VmRSS; elsewhere the peak, an upper bound)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text(encoding="utf-8").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc's malloc_trim): a large
    build frees gigabytes per component, which glibc otherwise keeps mapped in fragments."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):  # not glibc (musl): nothing to trim
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    """The C library, found once: ctypes.util.find_library runs ldconfig in a child process,
    a fork of a process that may hold gigabytes."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        name = ctypes.util.find_library("c")
        try:
            return ctypes.CDLL(name) if name else None
        except OSError:
            return None


def runtime_report() -> list[dict[str, Any]]:
    """Every registered backend's runtime: installed or not, its version and its extra."""
    from modelkiln.backends import backends
    from modelkiln.runtimes import RuntimeOptions

    report = []
    for backend in backends():
        runtime = backend.runtime_class()
        report.append(
            {
                "name": backend.name,
                "available": runtime.is_available(),
                "version": runtime.version(),
                "formats": sorted(runtime.formats),
                "extra": backend.name,
                # installed but unable to run here at all (Core ML off macOS)
                "cannot_run": runtime.unavailable_reason(RuntimeOptions()),
            }
        )
    return report


def openvino_devices() -> dict[str, list[str]]:
    """OpenVINO's devices and their optimisation capabilities (e.g. CPU: BF16, INT8)."""
    try:
        import openvino as ov
    except ImportError:
        return {}
    core = ov.Core()
    return {
        device: list(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        for device in core.available_devices
    }


def environment_report() -> dict[str, Any]:
    return {
        "host": host_info(),
        "libraries": library_versions(),
        "runtimes": runtime_report(),
        "openvino_devices": openvino_devices(),
    }


def cache_home() -> Path:
    """$MODELKILN_CACHE, else ~/.cache/modelkiln: bundles/, tensorrt/ and the digits set."""
    return Path(os.environ.get("MODELKILN_CACHE") or Path.home() / ".cache" / "modelkiln")
