"""This machine's CUDA GPU and TensorRT: the checks that fail with one clear line where either
is missing, and the facts (GPU model, TensorRT version) an engine is tied to."""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

from modelkiln.errors import BackendUnavailableError, UnsupportedError, first_line, missing_backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    """What an engine is built for: it runs only on this GPU model and TensorRT version."""

    gpu: str
    tensorrt: str


def require_cuda(what: str) -> None:
    """TensorRT builds and runs engines on an NVIDIA CUDA GPU; say so where there is none."""
    if importlib.util.find_spec("torch") is None:
        raise missing_backend("torch", "tensorrt")
    import torch

    if not torch.cuda.is_available():
        raise UnsupportedError(
            f"{what}: TensorRT engines build and run on an NVIDIA CUDA GPU, and this machine "
            "has none (torch.cuda.is_available() is False); use a machine with a CUDA GPU, or "
            "format 'onnx' or 'openvino' here"
        )


def cuda_index(device: str) -> int:
    """The GPU of a runtime.device of 'cuda' or 'cuda:N'."""
    name, _, index = device.partition(":")
    if name != "cuda" or (index and not index.isdigit()):
        raise UnsupportedError(
            f"TensorRT runs on CUDA devices, not runtime.device '{device}'; use 'cuda' or "
            "'cuda:N' (or another runtime for the CPU)"
        )
    return int(index or 0)


def import_tensorrt() -> Any:
    """The tensorrt module, or a BackendUnavailableError saying why it does not import."""
    if importlib.util.find_spec("tensorrt") is None:
        raise missing_backend("tensorrt", "tensorrt")
    try:
        import tensorrt
    except (ImportError, OSError) as error:
        # The wheel is there but not NVIDIA's libraries it loads (libnvinfer, the CUDA runtime).
        raise BackendUnavailableError(
            f"tensorrt is installed but does not load ({first_line(error)}); it needs NVIDIA's "
            "CUDA libraries: pip install 'modelkiln[tensorrt]' on a machine with an NVIDIA "
            "driver"
        ) from error
    return tensorrt


def current_device(trt: Any, index: int | None = None) -> Device:
    """The GPU `index` (None: torch's current one) and the TensorRT in use."""
    import torch

    return Device(gpu=torch.cuda.get_device_name(index), tensorrt=str(trt.__version__))


@functools.cache
def trt_logger(trt: Any) -> Any:
    """One ILogger per process that hands TensorRT's messages to logging (the library never
    prints); TensorRT warns when builders and runtimes are given different loggers."""
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        # Its warnings are mostly advice (int64 weights cast, layers without fp16 kernels).
        trt.ILogger.Severity.WARNING: logging.INFO,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            logger.log(levels.get(severity, logging.DEBUG), "tensorrt: %s", msg)

    return Logger()
