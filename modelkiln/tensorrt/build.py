"""engine_from_onnx: a TensorRT engine built from our ONNX on this GPU, or taken from the cache.

The artifact keeps the ONNX beside the engine, and engine.json says what the engine was built
from and for (recipe, ONNX sha256, GPU model, TensorRT version, cache key): a runtime on
another GPU or TensorRT version rebuilds the same recipe into its own cache instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkiln.artifact import sha256_file
from modelkiln.errors import ArtifactError, ExportError
from modelkiln.jsonfile import read_json_object
from modelkiln.outputs import write_file_atomic
from modelkiln.tensorrt.cache import (
    copy_atomic,
    engine_cache_path,
    timing_cache_path,
)
from modelkiln.tensorrt.device import Device, import_tensorrt, trt_logger
from modelkiln.tensorrt.recipe import EngineRecipe, cache_key, configure

logger = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
RECORD_FILE = "engine.json"
# (ONNX file, recipe, timing cache file or None) -> the serialized engine. The real one is
# serialized_engine; tests pass a fake.
BuildFunction = Callable[[Path, EngineRecipe, "Path | None"], bytes]


@dataclass(frozen=True)
class EngineRecord:
    """engine.json: what the engine beside it was built from and for."""

    onnx: str  # the ONNX file beside the engine
    onnx_sha256: str
    gpu: str
    tensorrt: str
    cache_key: str
    recipe: EngineRecipe
    from_cache: bool = False
    build_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "onnx": self.onnx,
            "onnx_sha256": self.onnx_sha256,
            "gpu": self.gpu,
            "tensorrt": self.tensorrt,
            "cache_key": self.cache_key,
            "recipe": self.recipe.to_json(),
            "from_cache": self.from_cache,
            "build_seconds": self.build_seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EngineRecord:
        try:
            return cls(
                onnx=str(data["onnx"]),
                onnx_sha256=str(data["onnx_sha256"]),
                gpu=str(data["gpu"]),
                tensorrt=str(data["tensorrt"]),
                cache_key=str(data["cache_key"]),
                recipe=EngineRecipe.from_json(data["recipe"]),
                from_cache=bool(data.get("from_cache", False)),
                build_seconds=float(data.get("build_seconds", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(
                f"malformed {RECORD_FILE} ({type(error).__name__}: {error}); rebuild the artifact"
            ) from error


def write_record(directory: Path, record: EngineRecord) -> Path:
    path = directory / RECORD_FILE
    path.write_text(json.dumps(record.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


def read_record(directory: Path) -> EngineRecord:
    path = directory / RECORD_FILE
    if not path.exists():
        raise ArtifactError(
            f"{path} is missing: a TensorRT artifact keeps it beside {ENGINE_FILE}; rebuild the "
            "artifact"
        )
    return EngineRecord.from_json(
        read_json_object(path, ArtifactError, fix="; rebuild the artifact")
    )


def onnx_sha256(path: Path) -> str:
    """The model file and its external weights (`<stem>.onnx_data`, when there is one)."""
    data = path.with_name(f"{path.stem}.onnx_data")
    parts = [sha256_file(path), sha256_file(data) if data.is_file() else ""]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


def engine_from_onnx(
    onnx_path: Path,
    engine_path: Path,
    recipe: EngineRecipe,
    device: Device,
    *,
    engine_cache: bool = True,
    timing_cache: bool = True,
    build: BuildFunction | None = None,
) -> EngineRecord:
    """Write the engine of `onnx_path` to `engine_path`: copied from the engine cache when it
    holds this key, else built (and then cached)."""
    digest = onnx_sha256(onnx_path)
    key = cache_key(device.gpu, device.tensorrt, digest, recipe)
    cached = engine_cache_path(key)
    started = time.perf_counter()
    from_cache = engine_cache and cached.is_file()
    if from_cache:
        logger.info("%s: engine %s... taken from the cache", onnx_path, key[:12])
        copy_atomic(cached, engine_path)
    else:
        timings = timing_cache_path(device.gpu, device.tensorrt) if timing_cache else None
        data = (build or serialized_engine)(onnx_path, recipe, timings)
        write_file_atomic(engine_path, data)
        if engine_cache:
            write_file_atomic(cached, data)
    return EngineRecord(
        onnx=onnx_path.name,
        onnx_sha256=digest,
        gpu=device.gpu,
        tensorrt=device.tensorrt,
        cache_key=key,
        recipe=recipe,
        from_cache=from_cache,
        build_seconds=round(time.perf_counter() - started, 2),
    )


def engine_for_device(
    engine_path: Path, device: Device, *, build: BuildFunction | None = None
) -> tuple[Path, EngineRecord]:
    """The engine to load here: the artifact's own when it was built for this GPU model and
    TensorRT version, else the same recipe rebuilt from the artifact's ONNX into the cache
    (the artifact itself may be read-only, or a bundle's unpacked copy)."""
    record = read_record(engine_path.parent)
    key = cache_key(device.gpu, device.tensorrt, record.onnx_sha256, record.recipe)
    if key == record.cache_key:
        return engine_path, record
    cached = engine_cache_path(key)
    if not cached.is_file():
        onnx_path = engine_path.parent / record.onnx
        if not onnx_path.is_file():
            raise ArtifactError(
                f"{engine_path} was built for {record.gpu} with TensorRT {record.tensorrt}, "
                f"and its ONNX ({onnx_path.name}) is missing to rebuild it for {device.gpu} "
                f"with TensorRT {device.tensorrt}; rebuild the artifact here"
            )
        logger.info(
            "%s was built for %s, TensorRT %s: rebuilding it for %s, TensorRT %s",
            engine_path,
            record.gpu,
            record.tensorrt,
            device.gpu,
            device.tensorrt,
        )
        timings = timing_cache_path(device.gpu, device.tensorrt)
        write_file_atomic(cached, (build or serialized_engine)(onnx_path, record.recipe, timings))
    rebuilt = EngineRecord(
        onnx=record.onnx,
        onnx_sha256=record.onnx_sha256,
        gpu=device.gpu,
        tensorrt=device.tensorrt,
        cache_key=key,
        recipe=record.recipe,
        from_cache=True,
    )
    return cached, rebuilt


def serialized_engine(onnx_path: Path, recipe: EngineRecipe, timing_cache: Path | None) -> bytes:
    """Parse the ONNX and build its engine with TensorRT's builder (on the current GPU)."""
    trt = import_tensorrt()
    log = trt_logger(trt)
    builder = trt.Builder(log)
    # Explicit batch is the only mode in TensorRT 10; precision comes from builder flags
    # (weakly typed), as the recipe says.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, log)
    # From the file, not bytes: the parser then finds the external weights beside it.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        raise ExportError(
            f"TensorRT's ONNX parser rejected {onnx_path}: "
            f"{errors[0].strip() if errors else 'no error reported'}{more}"
        )
    config = builder.create_builder_config()
    configure(trt, builder, config, recipe)
    if timing_cache is not None:
        config.set_timing_cache(_timing_cache(config, timing_cache), ignore_mismatch=False)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT could not build an engine from {onnx_path} with {recipe.to_json()} "
            "(run with -v for its log)"
        )
    logger.info("%s: engine built in %.1f s", onnx_path, time.perf_counter() - started)
    if timing_cache is not None:
        write_file_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _timing_cache(config: Any, path: Path) -> Any:
    """The timing cache saved by earlier builds on this GPU and TensorRT, else an empty one."""
    if path.is_file():
        try:
            return config.create_timing_cache(path.read_bytes())
        except Exception as error:  # a damaged file: TensorRT raises its own types
            logger.warning("ignoring the unreadable TensorRT timing cache %s: %s", path, error)
    return config.create_timing_cache(b"")
