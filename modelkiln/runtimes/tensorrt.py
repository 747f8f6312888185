"""The tensorrt backend: its descriptor and settings, and TensorRT sessions, a serialized
engine run on a CUDA GPU with I/O through torch CUDA tensors. It writes the `tensorrt` format.

An engine runs only on the GPU model and TensorRT version it was built for; engine.json beside
it says which. Elsewhere the session rebuilds the same recipe from the artifact's ONNX into
the engine cache once, and loads that (modelkiln.tensorrt.build.engine_for_device).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from modelkiln.backends import Backend
from modelkiln.errors import ArtifactError, InputError
from modelkiln.runtimes.base import Runtime, RuntimeOptions, Session
from modelkiln.specs import TensorSpec
from modelkiln.tensorrt.build import engine_for_device
from modelkiln.tensorrt.device import (
    cuda_index,
    current_device,
    import_tensorrt,
    require_cuda,
    trt_logger,
)
from modelkiln.tensorrt.settings import TensorRTSettings

# What a bundle's target needs for a tensorrt artifact: TensorRT 10, what the engine recipe is
# written for (pyproject's tensorrt extra).
TENSORRT = "tensorrt>=10,<11"


class TensorRTSession(Session):
    def __init__(
        self,
        entry: Path,
        name: str,
        inputs: Mapping[str, TensorSpec],
        outputs: Mapping[str, TensorSpec],
        options: RuntimeOptions,
    ) -> None:
        super().__init__(name, inputs, outputs)
        index = cuda_index(options.device)
        require_cuda(f"{name} (runtime 'tensorrt')")
        trt = import_tensorrt()
        import torch

        self._device = torch.device("cuda", index)
        with torch.cuda.device(self._device):
            device = current_device(trt, index)
            path, record = engine_for_device(entry, device)
            self._runtime = trt.Runtime(trt_logger(trt))
            self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise ArtifactError(
                    f"TensorRT cannot load {path} (run with -v for its log); the file may be "
                    "corrupted: run `kiln verify` or rebuild"
                )
            self._context = self._engine.create_execution_context()
            self._lock = threading.Lock()
            self._stream = torch.cuda.Stream(self._device)
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._check_backend_names(
            [n for n in names if is_input[n]], [n for n in names if not is_input[n]]
        )
        self._outputs = [n for n in names if not is_input[n]]
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        shapes = {n: tuple(engine.get_tensor_shape(n)) for n in names if is_input[n]}
        self._dynamic = {n for n, shape in shapes.items() if -1 in shape}
        self._info = {
            "runtime": "tensorrt",
            "device": device.gpu,
            "tensorrt": device.tensorrt,
            "inference_precision": record.recipe.compute,
            "builder_flags": list(record.recipe.flags),
            "engine": "built with the artifact" if path == entry else f"rebuilt here: {path}",
        }

    @property
    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        import torch

        held = {}  # the device tensors stay alive until the stream is done with them
        # An execution context holds its input shapes and tensor addresses: one call at a
        # time (the GPU runs one engine call at a time on this stream anyway).
        with self._lock, torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            for name, array in feeds.items():
                # np.require keeps 0-d arrays (the UNet's timestep); ascontiguousarray does not.
                host = np.require(array, dtype=self._dtypes[name], requirements="C")
                held[name] = torch.from_numpy(host).to(self._device)
                if name in self._dynamic and not self._context.set_input_shape(name, host.shape):
                    raise InputError(
                        f"{self.name}: input '{name}' of shape {host.shape} is outside the "
                        f"engine's optimization profile {self._profile(name)}; rebuild with "
                        "wider [shapes] bounds (max_batch_size, min/max_resolution)"
                    )
                self._context.set_tensor_address(name, held[name].data_ptr())
            for name in self._outputs:
                shape = tuple(self._context.get_tensor_shape(name))
                dtype = getattr(torch, self._dtypes[name].name)  # numpy and torch share names
                held[name] = torch.empty(shape, dtype=dtype, device=self._device)
                self._context.set_tensor_address(name, held[name].data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise ArtifactError(
                    f"{self.name}: TensorRT could not run the engine (run with -v for its log)"
                )
            # Synchronised: the call's time (Session.call_times) is the GPU's work, not a launch.
            self._stream.synchronize()
        return {name: held[name].cpu().numpy() for name in output_names}

    def _profile(self, name: str) -> str:
        shapes = self._engine.get_tensor_profile_shape(name, 0)
        return f"(min {tuple(shapes[0])}, max {tuple(shapes[2])})"

    def close(self) -> None:
        # The context before the engine before the runtime, as TensorRT requires.
        self._context = None
        self._engine = None
        self._runtime = None


class TensorRTRuntime(Runtime):
    name = "tensorrt"
    formats: ClassVar[frozenset[str]] = frozenset({"tensorrt"})
    compute_precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16", "bf16"})
    package = "tensorrt"
    distribution = "tensorrt"
    session_class = TensorRTSession


class TensorRTBackend(Backend):
    name = "tensorrt"
    summary = "TensorRT engines built from our ONNX on this machine's NVIDIA GPU"
    runtime = "modelkiln.runtimes.tensorrt:TensorRTRuntime"
    exporters: ClassVar[Mapping[str, str]] = {
        "tensorrt": "modelkiln.exporters.tensorrt:TensorRTExporter"
    }
    quantizers = "modelkiln.quantize.tensorrt"
    settings = TensorRTSettings
    packages = ("tensorrt",)
    needs = "an NVIDIA CUDA GPU"
    worker_resources: ClassVar[Mapping[str, float]] = {"GPU": 1}
    libraries = ("tensorrt",)
    deploy: ClassVar[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
        "tensorrt": {"linux-x86_64": (TENSORRT,), "linux-aarch64": (TENSORRT,)}
    }
    # The engine's record, and the ONNX it rebuilds from on another GPU or TensorRT version.
    companions: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "tensorrt": ("engine.json", "model.onnx", "model.onnx_data")
    }
    unsupported_schemes: ClassVar[Mapping[str, str]] = {
        "nf4-weights": "TensorRT has no NF4 kernels, its 4-bit weights are INT4 or FP4: use "
        "int4-weights",
        "int8-dynamic": "TensorRT takes int8 as explicit Q/DQ with calibrated activation "
        "scales: use int8-static",
    }
