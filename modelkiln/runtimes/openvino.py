"""The openvino backend: its descriptor and settings, and OpenVINO sessions, IR (and ONNX)
compiled for a device with explicit precision hints. It writes the `openvino` format.

On CPUs with AMX or AVX512-BF16, OpenVINO runs fp32 models in bf16 unless told otherwise, so the
inference precision is always set explicitly, and the precision the compiled model reports is
what the manifest and `kiln info` show.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from modelkiln.backends import Backend, BackendSettings
from modelkiln.errors import ArtifactError, UnsupportedError
from modelkiln.runtimes.base import Runtime, RuntimeOptions, Session, resolve_compute
from modelkiln.runtimes.pool import Pool
from modelkiln.specs import TensorSpec

# Our precision names -> OpenVINO's element type names for INFERENCE_PRECISION_HINT.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
# What a bundle's target needs for an openvino artifact. 2024.4: the oldest our openvino extra
# allows (pyproject.toml); it reads the IR v11 that ov.save_model writes with NNCF's
# int8/int4/nf4-compressed weights.
OPENVINO = "openvino>=2024.4"


@dataclass(frozen=True)
class OpenVINOSettings(BackendSettings):
    """[openvino]: how the IR is made, and OpenVINO's performance hint at load."""

    section: ClassVar[str] = "openvino"
    # Convert the torch module (ov.convert_model) or our ONNX export of it.
    via: Literal["torch", "onnx"] = "torch"
    performance_hint: Literal["latency", "throughput"] | None = None


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
        try:
            model = core.read_model(str(entry))
            self._compiled = core.compile_model(model, device, compile_config(options))
        except RuntimeError as error:
            raise ArtifactError(
                f"OpenVINO cannot load {entry}: {str(error).strip().splitlines()[0]}; "
                "the file may be corrupted: run `kiln verify` or rebuild"
            ) from error
        self._check_backend_names(
            [_port_name(port, inputs) for port in self._compiled.inputs],
            [name for port in self._compiled.outputs for name in port.get_names()],
        )
        # An infer request holds its tensors: one per concurrent call, as many as OpenVINO
        # runs at once for this compiled model (1 under the latency hint on a CPU).
        optimal = int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._requests = Pool(self._compiled.create_infer_request, max(1, optimal))
        self._output_ports = {
            name: port for port in self._compiled.outputs for name in port.get_names()
        }
        self._device = device

    @property
    def info(self) -> dict[str, Any]:
        return compiled_info(self._compiled, self._device)

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        with self._requests.borrow() as request:
            request.infer(feeds)
            # copy: the request's output buffers are reused by its next inference
            return {
                name: request.get_tensor(self._output_ports[name]).data.copy()
                for name in output_names
            }

    def close(self) -> None:
        self._requests.clear()
        self._compiled = None


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
