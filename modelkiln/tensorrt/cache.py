"""Where engines and kernel timings are kept between builds: $MODELKILN_CACHE/tensorrt/.

engines/<key>.engine: one engine per cache key (GPU model, TensorRT version, ONNX sha256,
recipe), so a rebuild with nothing changed is a copy. timing/<gpu>-trt<version>.cache:
TensorRT's timing cache, valid for one GPU model and TensorRT version, shared by every build
there. Every write lands in a temporary sibling first and is renamed into place: a reader
never sees half a file, and concurrent builds of the same key each write a whole one.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from modelkiln.env import cache_home
from modelkiln.outputs import atomic_file

ENGINE_SUFFIX = ".engine"


def cache_dir() -> Path:
    """tensorrt/ under $MODELKILN_CACHE (~/.cache/modelkiln)."""
    return cache_home() / "tensorrt"


def engine_cache_path(key: str) -> Path:
    return cache_dir() / "engines" / f"{key}{ENGINE_SUFFIX}"


def timing_cache_path(gpu_name: str, trt_version: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu_name).strip("-") or "gpu"
    return cache_dir() / "timing" / f"{slug}-trt{trt_version}.cache"


def copy_atomic(source: Path, target: Path) -> None:
    with atomic_file(target) as staged:
        shutil.copyfile(source, staged)
