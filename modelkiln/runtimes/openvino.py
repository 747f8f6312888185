"""The openvino backend: its descriptor and settings, and OpenVINO sessions, IR (and ONNX)
compiled for a device with explicit precision hints. It writes the `openvino` format.

On CPUs with AMX or AVX512-BF16, OpenVINO runs fp32 models in bf16 unless told otherwise, so the
inference precision is always set explicitly, and the precision the compiled model reports is
what the manifest and `kiln info` show.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from modelkiln.backends import Backend, BackendSettings
from modelkiln.errors import ArtifactError, UnsupportedError
from modelkiln.runtimes.base import Runtime, RuntimeOptions, Session, resolve_compute
from modelkiln.runtimes.openvino_weights import decompress_at_load
from modelkiln.runtimes.pool import Pool
from modelkiln.specs import TensorSpec

# Our precision names -> OpenVINO's element type names for INFERENCE_PRECISION_HINT.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
# How many static-shaped compilations a session with static_shapes keeps (guided and
# unguided denoiser batches): each holds its own copy of the weights.
STATIC_SHAPES_KEPT = 2
# What a bundle's target needs for an openvino artifact. 2024.4: the oldest our openvino extra
# allows (pyproject.toml); it reads the IR v11 that ov.save_model writes with NNCF's
# int8/int4/nf4-compressed weights.
OPENVINO = "openvino>=2024.4"


def _load_error(entry: Path, message: str) -> Exception:
    """Why OpenVINO could not read or compile `entry`: an ONNX file with ops its frontend has
    no conversion for (ONNX Runtime's com.microsoft fusions) is no corrupt file."""
    unconverted = re.search(r"No conversion rule found for operations: ([^\n]+)", message)
    if unconverted:
        return UnsupportedError(
            f"OpenVINO cannot run {entry}: it has no conversion for {unconverted[1].strip()} "
            "(ONNX Runtime's own fused ops); run it on onnxruntime, or build with "
            "[onnxruntime] fusions = 'none'"
        )
    return ArtifactError(
        f"OpenVINO cannot load {entry}: {message.strip().splitlines()[0]}; "
        "the file may be corrupted: run `kiln verify` or rebuild"
    )


@dataclass(frozen=True)
class OpenVINOSettings(BackendSettings):
    """[openvino]: how the IR is made, and OpenVINO's performance hint at load."""

    section: ClassVar[str] = "openvino"
    # Convert the torch module (ov.convert_model) or our ONNX export of it.
    via: Literal["torch", "onnx"] = "torch"
    performance_hint: Literal["latency", "throughput"] | None = None
    # Compile a static-shaped copy of a dynamic model for each input shape it is called with
    # (the last STATIC_SHAPES_KEPT used are kept): OpenVINO's CPU plugin runs a static graph
    # faster (an SD-1.5-sized UNet step 4.5 % on AMX), for one compile per new shape (4 s for
    # that UNet). For a process that serves many calls; a one-shot run loses by it.
    static_shapes: bool = False
    # Weight-only MatMuls' compressed weights decompressed once at load
    # (runtimes/openvino_weights.py): "int8", "all" (int4/nf4 as well), "none", or "auto"
    # (int8 on a CPU with AMX computing in bf16, where it is faster, when memory allows).
    decompress_weights: Literal["auto", "int8", "all", "none"] = "auto"


def compile_config(options: RuntimeOptions) -> dict[str, str]:
    precision = resolve_compute(options.compute_precision, OpenVINORuntime)
    config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision]}
    hint = options.backend(OpenVINOSettings).performance_hint
    if hint:
        config["PERFORMANCE_HINT"] = hint.upper()
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = str(options.threads)
    return config


class OpenVINOSession(Session):
    def __init__(
        self,
        entry: Path,
        name: str,
        inputs: Mapping[str, TensorSpec],
        outputs: Mapping[str, TensorSpec],
        options: RuntimeOptions,
    ) -> None:
        import openvino as ov

        super().__init__(name, inputs, outputs)
        core = ov.Core()
        device = options.device.upper()
        if device not in core.available_devices:
            raise UnsupportedError(
                f"OpenVINO device '{options.device}' is not available here; available: "
                f"{', '.join(d.lower() for d in core.available_devices)}"
            )
        self._core, self._device, self._config = core, device, compile_config(options)
        try:
            model = core.read_model(str(entry))
            self._decompressed = decompress_at_load(
                model,
                options.backend(OpenVINOSettings).decompress_weights,
                device,
                resolve_compute(options.compute_precision, OpenVINORuntime),
            )
            self._compiled = Compiled(core.compile_model(model, device, self._config))
        except RuntimeError as error:
            raise _load_error(entry, str(error)) from error
        self._port_names = [_port_name(port, inputs) for port in model.inputs]
        self._check_backend_names(
            [_port_name(port, inputs) for port in self._compiled.model.inputs],
            [name for port in self._compiled.model.outputs for name in port.get_names()],
        )
        dynamic = any(port.get_partial_shape().is_dynamic for port in model.inputs)
        static = options.backend(OpenVINOSettings).static_shapes
        # The read model stays while static copies of it may be compiled; the dynamic
        # compilation serves until the first one is.
        self._model = model if static and dynamic and set(self._port_names) == set(inputs) else None
        self._static: OrderedDict[tuple[tuple[int, ...], ...], Compiled] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def info(self) -> dict[str, Any]:
        info = compiled_info(self._compiled.model, self._device)
        if self._decompressed:
            info["decompressed_matmul_weights"] = self._decompressed
        if self._model is not None:
            # Most recently used last.
            info["static_shapes"] = [
                dict(zip(self._port_names, shapes, strict=True)) for shapes in self._static
            ]
        return info

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        compiled = self._compiled if self._model is None else self._for_shapes(feeds)
        with compiled.requests.borrow() as request:
            request.infer(feeds)
            # copy: the request's output buffers are reused by its next inference
            return {
                name: request.get_tensor(compiled.outputs[name]).data.copy()
                for name in output_names
            }

    def _for_shapes(self, feeds: Mapping[str, np.ndarray]) -> Compiled:
        """The compilation of the model reshaped to these feeds' shapes, compiled on first
        need; the least recently used beyond STATIC_SHAPES_KEPT is dropped."""
        assert self._model is not None
        shapes = tuple(tuple(feeds[name].shape) for name in self._port_names)
        with self._lock:  # one compile at a time; concurrent callers of a new shape wait
            compiled = self._static.get(shapes)
            if compiled is None:
                try:
                    self._model.reshape({i: list(shape) for i, shape in enumerate(shapes)})
                    compiled = Compiled(
                        self._core.compile_model(self._model, self._device, self._config)
                    )
                except RuntimeError as error:
                    raise UnsupportedError(
                        f"OpenVINO cannot compile {self.name} for input shapes "
                        f"{dict(zip(self._port_names, shapes, strict=True))}: "
                        f"{str(error).strip().splitlines()[0]}; load it without static_shapes"
                    ) from error
                self._static[shapes] = compiled
                if len(self._static) > STATIC_SHAPES_KEPT:
                    self._static.popitem(last=False)
                # The dynamic compilation's weights go once a static one serves.
                self._compiled = compiled
            self._static.move_to_end(shapes)
            return compiled

    def close(self) -> None:
        self._compiled.requests.clear()
        self._static.clear()
        self._model = None


class Compiled:
    """A compiled model, its infer requests and its output ports by name."""

    def __init__(self, model: Any) -> None:
        self.model = model
        # An infer request holds its tensors: one per concurrent call, as many as OpenVINO
        # runs at once for this compiled model (1 under the latency hint on a CPU).
        optimal = int(model.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.requests = Pool(model.create_infer_request, max(1, optimal))
        self.outputs = {name: port for port in model.outputs for name in port.get_names()}


def compiled_info(compiled: Any, device: str) -> dict[str, Any]:
    """What the manifest records of a compiled model: device, precision, hint, threads."""
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    return {
        "runtime": "openvino",
        "device": device,
        "inference_precision": str(precision.get_type_name()),
        "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")).lower(),
        "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
    }


class OpenVINORuntime(Runtime):
    name = "openvino"
    formats: ClassVar[frozenset[str]] = frozenset({"openvino", "onnx"})
    compute_precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "bf16", "fp16"})
    native_bf16 = True
    package = "openvino"
    distribution = "openvino"
    session_class = OpenVINOSession


class OpenVINOBackend(Backend):
    name = "openvino"
    summary = "OpenVINO IR (openvino_model.xml/.bin), run by OpenVINO; it runs ONNX files too"
    runtime = "modelkiln.runtimes.openvino:OpenVINORuntime"
    exporters: ClassVar[Mapping[str, str]] = {
        "openvino": "modelkiln.exporters.openvino:OpenVINOExporter"
    }
    quantizers = "modelkiln.quantize.openvino"
    settings = OpenVINOSettings
    packages = ("openvino",)
    libraries = ("openvino", "nncf")
    deploy: ClassVar[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
        "openvino": {"linux-x86_64": (OPENVINO,), "linux-aarch64": (OPENVINO,)}
    }
    companions: ClassVar[Mapping[str, tuple[str, ...]]] = {"openvino": ("{stem}.bin",)}


def _port_name(port: Any, expected: Mapping[str, Any]) -> str:
    """The port's name among those the manifest expects: compiling can merge a tensor the
    graph computes from an input (an int64 cast of input_ids) into the input port, which then
    carries both names, and get_any_name() may return the other one."""
    names = port.get_names()
    return next((name for name in sorted(names) if name in expected), port.get_any_name())
