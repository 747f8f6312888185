"""The onnxruntime backend: its descriptor and settings, and ONNX Runtime sessions (CPU by
default; CUDA when onnxruntime-gpu is installed). It writes the `onnx` format."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from modelkiln.backends import Backend, BackendSettings
from modelkiln.errors import ArtifactError, UnsupportedError, first_line
from modelkiln.runtimes.base import Runtime, RuntimeOptions, Session
from modelkiln.specs import TensorSpec

# What a bundle's target needs for an onnx artifact. ONNX Runtime 1.19: reads ONNX IR 10 at
# opset 18 and the com.microsoft ops that our fusions and 4-bit quantization emit (Attention,
# MatMulNBits); its mobile packages (Android AAR, iOS/macOS pods) come from the same line.
ONNXRUNTIME = "onnxruntime>=1.19"
# Model metadata: the com.microsoft ops the export's fusions left in the graph, as JSON
# {op: count} (exporters/onnx_fusions.py writes it, the session reports it).
FUSED_OPS_KEY = "modelkiln.fused_ops"


@dataclass(frozen=True)
class OnnxRuntimeSettings(BackendSettings):
    """[onnxruntime]: the ONNX export's fused ops, and how ONNX Runtime optimizes at load."""

    section: ClassVar[str] = "onnxruntime"
    graph_optimization: Literal["all", "extended", "basic", "disabled"] = "all"
    # ONNX Runtime's fused Attention/Gelu ops in the exported graph (exporters/onnx_fusions.py)
    fusions: Literal["auto", "none"] = "auto"


_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OnnxRuntimeSession(Session):
    # Optional inputs are initializers the feeds may override (exporters/onnx.py).
    holds_defaults = True

    def __init__(
        self,
        entry: Path,
        name: str,
        inputs: Mapping[str, TensorSpec],
        outputs: Mapping[str, TensorSpec],
        options: RuntimeOptions,
    ) -> None:
        import onnxruntime as ort

        super().__init__(name, inputs, outputs)
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[options.backend(OnnxRuntimeSettings).graph_optimization]
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        session_options.log_severity_level = 3  # the library never prints; errors still raise
        providers = _providers_for(options.device, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(
                str(entry), sess_options=session_options, providers=providers
            )
        except Exception as error:  # onnxruntime raises its own untyped exceptions
            raise ArtifactError(
                f"onnxruntime cannot load {entry}: {str(error).splitlines()[0]}; "
                "the file may be corrupted: run `kiln verify` or rebuild"
            ) from error
        overridable = [i.name for i in self._session.get_overridable_initializers()]
        optional = [name for name in overridable if name in inputs and inputs[name].optional]
        self._check_backend_names(
            [i.name for i in self._session.get_inputs()] + optional,
            [o.name for o in self._session.get_outputs()],
        )
        # Bound inputs, as ONNX Runtime's LoRA adapter that supplies them (see _bind).
        self._adapter: Any = None
        self._run_options: Any = None
        self._adapter_names: frozenset[str] = frozenset()
        self._threads = options.threads
        self._precision = {"fp16": "f16", "bf16": "bf16"}.get(options.compute_precision, "f32")
        self._graph_optimization = options.backend(OnnxRuntimeSettings).graph_optimization
        fused = self._session.get_modelmeta().custom_metadata_map.get(FUSED_OPS_KEY)
        self._fused_ops = json.loads(fused) if fused else {}

    @property
    def info(self) -> dict[str, Any]:
        return {
            "runtime": "onnxruntime",
            "providers": self._session.get_providers(),
            # What the graph's own types say (onnxruntime never changes them); ops without
            # an fp16 CPU kernel run in f32 between Casts.
            "inference_precision": self._precision,
            "threads": self._threads or "default",
            "graph_optimization": self._graph_optimization,
            "fused_ops": self._fused_ops,
        }

    def _bind(self, arrays: dict[str, np.ndarray]) -> None:
        """Bound inputs become an ONNX Runtime LoRA adapter, active in every call's
        RunOptions: written once, memory-mapped by ONNX Runtime, and kept alive while the
        RunOptions use it (it is ignored otherwise)."""
        import tempfile

        import onnxruntime as ort

        self._run_options, self._adapter, self._adapter_names = None, None, frozenset()
        if not arrays:
            return
        with tempfile.TemporaryDirectory(
            prefix="kiln-adapter-",
            ignore_cleanup_errors=True,  # Windows: mapped files stay
        ) as scratch:
            path = Path(scratch) / "bound.onnx_adapter"
            export_adapter(arrays, path)
            adapter = ort.LoraAdapter()
            adapter.Load(str(path))  # memory-mapped: the mapping outlives the file's name
        run_options = ort.RunOptions()
        run_options.add_active_adapter(adapter)
        self._adapter, self._run_options = adapter, run_options
        self._adapter_names = frozenset(arrays)

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        if self._adapter_names:
            feeds = {k: v for k, v in feeds.items() if k not in self._adapter_names}
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException
        from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as Missing

        try:
            results = self._session.run(output_names, feeds, self._run_options)
        except (Fail, Missing, RuntimeException) as error:
            # A kernel this build of ONNX Runtime lacks for an op and type (fp16 scatter on
            # the CPU): the model is valid, this runtime cannot run it.
            raise UnsupportedError(
                f"{self.name}: ONNX Runtime cannot run this model: {first_line(error)}; build "
                "it in another precision, or for another runtime"
            ) from error
        return dict(zip(output_names, results, strict=True))

    def close(self) -> None:
        self._session = None
        self._run_options, self._adapter = None, None


def export_adapter(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """Named arrays as an ONNX Runtime adapter file (what `LoraAdapter.Load` reads)."""
    import onnxruntime as ort

    # OrtValues borrow the arrays' memory: `arrays` stays alive until the file is written
    # (a freed array would be written as garbage, NaNs).
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    adapter_format = ort.AdapterFormat()
    adapter_format.set_parameters(values)
    adapter_format.export_adapter(str(path))


def _providers_for(device: str, available: list[str]) -> list[str]:
    if device not in _PROVIDERS:
        raise UnsupportedError(
            f"onnxruntime device '{device}' is not supported; use one of: {', '.join(_PROVIDERS)}"
        )
    provider = _PROVIDERS[device]
    if provider not in available:
        raise UnsupportedError(
            f"onnxruntime here has no {provider} (available: {', '.join(available)}); "
            "for CUDA install onnxruntime-gpu on a machine with an NVIDIA GPU"
        )
    return [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})
    compute_precisions: ClassVar[frozenset[str]] = frozenset({"fp32", "fp16"})
    compute_follows_weights = True
    package = "onnxruntime"
    distribution = "onnxruntime"
    session_class = OnnxRuntimeSession


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    summary = "ONNX files in optimum's layout, run by ONNX Runtime (CPU; CUDA with -gpu)"
    runtime = "modelkiln.runtimes.onnxruntime:OnnxRuntime"
    exporters: ClassVar[Mapping[str, str]] = {"onnx": "modelkiln.exporters.onnx:OnnxExporter"}
    quantizers = "modelkiln.quantize.onnx"
    settings = OnnxRuntimeSettings
    packages = ("onnxruntime",)
    libraries = ("onnx", "onnxscript", "onnx-ir", "onnxruntime", "onnxruntime-gpu")
    deploy: ClassVar[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
        "onnx": {
            target: (ONNXRUNTIME,)
            for target in ("linux-x86_64", "linux-aarch64", "android", "macos")
        }
    }
    companions: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "onnx": ("{stem}.onnx_data",)  # external weights, optimum's naming
    }
