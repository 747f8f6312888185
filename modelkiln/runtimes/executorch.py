"""The executorch backend: its descriptor and settings, and sessions on ExecuTorch's Python
runtime (`executorch.runtime`). It writes the `executorch` format: one `model.pte` per
component, lowered to the delegate the profile's `[executorch] partitioner` names.

What runs where: the pip wheel's runtime registers the XNNPACK delegate (and the portable
kernels every program falls back to), so `xnnpack` and `portable` programs run and are
validated here. Core ML and Vulkan programs lower anywhere but need a runtime built with
their delegate (an Apple device, a Vulkan GPU build): the build records their validation as
not run, with the torch outputs saved for a later `kiln validate`, as Core ML does.

A dynamic batch is exported with an upper bound (`shapes.max_batch_size`): ExecuTorch plans
its memory for the largest batch and refuses a larger one at run time, which the session
reports as an input error before the program sees it.

ExecuTorch takes and returns torch tensors, so running a .pte needs torch (the wheel depends
on it); feeds and outputs are numpy as on every backend. Outputs are copied: the program's
output tensors live in its planned memory, which the next call overwrites.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from modelkiln.backends import Backend, BackendSettings, ProfileContext
from modelkiln.errors import ArtifactError, InputError, UnsupportedError, first_line
from modelkiln.runtimes.base import Runtime, RuntimeOptions, Session
from modelkiln.specs import TensorSpec

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
    from modelkiln.records import Manifest

logger = logging.getLogger(__name__)

# Our partitioner names -> the delegate the runtime must have registered (None: the portable
# kernels, which every runtime has).
DELEGATES: Mapping[str, str | None] = {
    "xnnpack": "XnnpackBackend",
    "coreml": "CoreMLBackend",
    "vulkan": "VulkanBackend",
    "portable": None,
}
# Where each delegate's runtime comes from, for the not-run reason.
DELEGATE_HOMES = {
    "coreml": "an ExecuTorch runtime built with the Core ML delegate (iOS / macOS)",
    "vulkan": "an ExecuTorch runtime built with the Vulkan delegate (Android / a Vulkan GPU)",
}
MODEL_FILE = "model.pte"
# Written beside it by the exporter: what the delegate took, what stayed on portable kernels.
DELEGATION_FILE = "delegation.json"
PIP_RUNTIME = "executorch>=1.5,<1.6"
# The families whose components this backend exports and validates so far.
FAMILIES_SERVED = ("vit", "sd", "sdxl")


@dataclass(frozen=True)
class ExecuTorchSettings(BackendSettings):
    """[executorch]: the program of format 'executorch'."""

    section: ClassVar[str] = "executorch"
    # Which delegate the graph is lowered to (to_edge_transform_and_lower's partitioner);
    # "portable": none, every op on ExecuTorch's portable kernels.
    partitioner: Literal["xnnpack", "coreml", "vulkan", "portable"] = "xnnpack"
    # With xnnpack: LayerNorm, GroupNorm and attention exported as ops XNNPACK takes
    # (exporters/xnnpack_rewrites.py); false: as the model wrote them, those ops on the
    # portable kernels between delegated pieces.
    rewrite_for_xnnpack: bool = True


@contextlib.contextmanager
def native_logs_to_debug() -> Iterator[None]:
    """ExecuTorch's C++ runtime writes its logs to file descriptor 2 (cpu probing when it
    loads, threadpool resets, a delegate it lacks): the library never prints, so they go to
    the debug log. Only around the calls that log, on this process's stderr."""
    with tempfile.TemporaryFile(mode="w+b") as captured:
        saved = os.dup(2)
        try:
            os.dup2(captured.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace").strip()
            if text:
                logger.debug("executorch runtime:\n%s", text)


def et_runtime() -> Any:
    """ExecuTorch's process-wide runtime (executorch.runtime.Runtime.get())."""
    with native_logs_to_debug():
        from executorch.runtime import Runtime as ETRuntime

        return ETRuntime.get()


def registered_delegates() -> list[str]:
    """The delegates this process's ExecuTorch runtime has (XnnpackBackend, ...)."""
    return list(et_runtime().backend_registry.registered_backend_names)


def delegate_problem(partitioner: str) -> str | None:
    """Why this machine's ExecuTorch runtime cannot run a program lowered to `partitioner`."""
    delegate = DELEGATES[partitioner]
    if delegate is None:
        return None
    try:
        available = registered_delegates()
    except ImportError:
        return None  # no executorch at all: Runtime.require names the extra
    if delegate in available:
        return None
    home = DELEGATE_HOMES.get(partitioner, f"an ExecuTorch runtime with {delegate}")
    return (
        f"this ExecuTorch runtime has no {delegate} (it has {', '.join(available) or 'none'}); "
        f"a {partitioner} program runs on {home}: run `kiln validate` there, or set "
        "executorch.partitioner = 'xnnpack' for this machine"
    )


def set_threads(threads: int) -> None:
    """ExecuTorch's threadpool (XNNPACK's threads) is one per process: resized only when it
    differs, since resizing while another session runs is unsafe."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        with native_logs_to_debug():
            portable_lib._unsafe_reset_threadpool(threads)


def read_delegation(path: Path) -> dict[str, Any]:
    """The exporter's record of the program: its precision and delegation counts (delegated
    and portable nodes); {} when absent."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    keys = ("inference_precision", "delegated_subgraphs", "delegated_nodes", "portable_nodes")
    return {key: data[key] for key in keys if isinstance(data, dict) and key in data}


class ExecuTorchSession(Session):
    def __init__(
        self,
        entry: Path,
        name: str,
        inputs: Mapping[str, TensorSpec],
        outputs: Mapping[str, TensorSpec],
        options: RuntimeOptions,
    ) -> None:
        super().__init__(name, inputs, outputs)
        if options.device != "cpu":
            raise UnsupportedError(
                f"{name}: the executorch runtime runs on 'cpu' here, not '{options.device}'; "
                "the delegate (executorch.partitioner) decides what hardware a program uses"
            )
        self._partitioner = options.backend(ExecuTorchSettings).partitioner
        problem = delegate_problem(self._partitioner)
        if problem is not None:
            raise UnsupportedError(f"{name}: {problem}")
        if options.threads:
            set_threads(options.threads)
        runtime = et_runtime()
        try:
            with native_logs_to_debug():
                program = runtime.load_program(Path(entry))
                self._method = program.load_method("forward")
        except (RuntimeError, ValueError) as error:
            raise ArtifactError(
                f"ExecuTorch cannot load {entry}: {first_line(error)}; the program may be "
                "corrupted or from another ExecuTorch release: run `kiln verify` or rebuild"
            ) from error
        if self._method is None:
            raise ArtifactError(f"{entry} has no 'forward' method; rebuild the artifact")
        meta = self._method.metadata
        if meta.num_inputs() != len(self.input_specs) or meta.num_outputs() < len(outputs):
            raise ArtifactError(
                f"{name}: the program takes {meta.num_inputs()} input(s) and returns "
                f"{meta.num_outputs()}, but the manifest says {sorted(self.input_specs)} -> "
                f"{sorted(self.output_specs)}; rebuild the artifact"
            )
        # The planned (largest) shape of each input: a dynamic dim's upper bound.
        self._largest = {
            input_name: tuple(meta.input_tensor_meta(index).sizes())
            for index, input_name in enumerate(self.input_specs)
        }
        # The bound of the batch axis (pipelines chunk larger batches): the planned size of
        # the first input whose first dim is the symbolic batch.
        batch_bounds = [
            self._largest[input_name][0]
            for input_name, spec in self.input_specs.items()
            if spec.shape and spec.shape[0] == "batch"
        ]
        self.max_batch = batch_bounds[0] if batch_bounds else None
        # One Method holds one set of planned buffers: one call at a time.
        self._lock = threading.Lock()
        self._delegation = read_delegation(Path(entry).with_name(DELEGATION_FILE))

    @property
    def info(self) -> dict[str, Any]:
        from executorch.extension.pybindings import portable_lib

        return {
            "runtime": "executorch",
            "delegate": self._partitioner,
            "inference_precision": "f32",
            **self._delegation,
            "threads": portable_lib._threadpool_get_thread_count(),
        }

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        import torch

        for input_name, array in feeds.items():
            largest = self._largest[input_name]
            if len(largest) == array.ndim and any(
                n > most for n, most in zip(array.shape, largest, strict=True)
            ):
                raise InputError(
                    f"{self.name}: input '{input_name}' has shape {list(array.shape)}, beyond "
                    f"the largest the program was built for, {list(largest)}: run smaller "
                    "batches, or rebuild with a larger shapes.max_batch_size"
                )
        # np.require keeps 0-d feeds 0-d, as the program was exported (the UNet's timestep).
        tensors = [
            torch.from_numpy(np.require(feeds[name], requirements="C")) for name in self.input_specs
        ]
        with self._lock:
            results = self._method.execute(tensors)
            # Copied inside the lock: the next call writes the same planned memory.
            arrays = [np.array(tensor.numpy(), copy=True) for tensor in results]
        return dict(zip(self.output_specs, arrays, strict=False))

    def close(self) -> None:
        self._method = None


class ExecuTorchRuntime(Runtime):
    name = "executorch"
    formats: ClassVar[frozenset[str]] = frozenset({"executorch"})
    compute_precisions: ClassVar[frozenset[str]] = frozenset({"fp32"})
    # The program computes in the types it stores (fp32, or the int8 of a quantized graph).
    compute_follows_weights = True
    package = "executorch"
    distribution = "executorch"
    session_class = ExecuTorchSession

    @classmethod
    def unavailable_reason(cls, options: RuntimeOptions) -> str | None:
        return delegate_problem(options.backend(ExecuTorchSettings).partitioner)


# ExecuTorch's Android runtime, the AAR on Maven Central: `executorch-android` has XNNPACK and
# the portable kernels, `executorch-android-vulkan` adds the Vulkan delegate (the flavors of
# extension/android/executorch_android/build.gradle's coordinates).
ANDROID_AAR = "org.pytorch:executorch-android"
ANDROID_VULKAN_AAR = "org.pytorch:executorch-android-vulkan"
# Which AARs run our programs. ExecuTorch promises no forward compatibility (an older runtime
# may refuse a newer program) and that a program runs on its own release and at least the next
# minor one (runtime/COMPATIBILITY.md): PIP_RUNTIME exports 1.5 programs, so 1.5 and 1.6. The
# README's Gradle line names 1.5.1, the first 1.5 AAR (Maven Central has no 1.5.0).
ANDROID_RUNTIME_RANGE = ">=1.5,<1.7"
ANDROID_AAR_VERSION = "1.5.1"
# What the Vulkan delegate needs of the device (backends/vulkan's docs: Vulkan 1.1).
VULKAN_DEVICE = "Vulkan>=1.1"


def undeployable(partitioner: str, target: str) -> str:
    """Why target cannot run a program lowered to partitioner (coreml, or vulkan off Android)."""
    refused = f"target '{target}' cannot run this executorch program"
    if partitioner == "coreml" and target == "macos":
        return (
            f"{refused}: modelkiln does not package Core ML-partitioned programs yet; for Core "
            "ML on macOS build the coreml format (`kiln profiles list coreml`), or rebuild "
            "with executorch.partitioner = 'xnnpack'"
        )
    if partitioner == "coreml":
        gpu = " (CPU) or 'vulkan' (GPU)" if target == "android" else ""
        return (
            f"{refused}: it is lowered to Core ML (executorch.partitioner = 'coreml'), which "
            f"only Apple devices run; rebuild with executorch.partitioner = 'xnnpack'{gpu}"
        )
    return (
        f"{refused}: it is lowered to Vulkan (executorch.partitioner = '{partitioner}') and "
        f"the pip runtime has no Vulkan delegate; package it for android ({ANDROID_VULKAN_AAR}), "
        "or rebuild with executorch.partitioner = 'xnnpack'"
    )


class ExecuTorchBackend(Backend):
    name = "executorch"
    summary = (
        "ExecuTorch programs (.pte) lowered to XNNPACK (CPU), Core ML or Vulkan; the pip "
        "runtime runs XNNPACK and portable programs"
    )
    runtime = "modelkiln.runtimes.executorch:ExecuTorchRuntime"
    exporters: ClassVar[Mapping[str, str]] = {
        "executorch": "modelkiln.exporters.executorch:ExecuTorchExporter"
    }
    quantizers = "modelkiln.quantize.executorch"
    settings = ExecuTorchSettings
    packages = ("executorch",)
    needs = "the delegate's runtime for coreml / vulkan programs (xnnpack runs anywhere)"
    libraries = ("executorch", "torch")
    # The pip runtime and the Android AAR (XNNPACK and portable programs); see `requirements`.
    deploy: ClassVar[Mapping[str, Mapping[str, tuple[str, ...]]]] = {
        "executorch": {
            **{target: (PIP_RUNTIME,) for target in ("linux-x86_64", "linux-aarch64", "macos")},
            "android": (f"{ANDROID_AAR}{ANDROID_RUNTIME_RANGE}",),
        }
    }
    # Packed on every target though only our session reads it (`info`): it lists the ops left
    # on portable kernels, which a runtime built with selected kernels must include.
    companions: ClassVar[Mapping[str, tuple[str, ...]]] = {"executorch": (DELEGATION_FILE,)}
    unsupported_schemes: ClassVar[Mapping[str, str]] = {
        "int8-weights": "XNNPACK runs int8 weights with int8 activations: use int8-dynamic",
    }

    @classmethod
    def requirements(cls, format: str, target: str, profile: Profile) -> tuple[str, ...] | None:
        """By the delegate the programs were lowered to: xnnpack and portable programs run on
        the pip runtime and the Android AAR; a vulkan program needs Android's Vulkan AAR and a
        Vulkan GPU; a coreml one none of our targets' runtimes (raises, saying why)."""
        needs = super().requirements(format, target, profile)
        partitioner = ExecuTorchSettings.of(profile).partitioner
        if needs is None or DELEGATES[partitioner] in (None, "XnnpackBackend"):
            return needs
        if partitioner == "vulkan" and target == "android":
            return (f"{ANDROID_VULKAN_AAR}{ANDROID_RUNTIME_RANGE}", VULKAN_DEVICE)
        raise UnsupportedError(undeployable(partitioner, target))

    @classmethod
    def runner_readme(cls, format: str, target: str, manifest: Manifest) -> str:
        """The programs run with ExecuTorch's own APIs (runtimes/executorch_runner.py)."""
        from modelkiln.runtimes.executorch_runner import runner_readme

        partitioner = ExecuTorchSettings.of(manifest.profile).partitioner
        return runner_readme(
            target,
            manifest,
            aar=ANDROID_VULKAN_AAR if partitioner == "vulkan" else ANDROID_AAR,
            aar_version=ANDROID_AAR_VERSION,
            pip_runtime=PIP_RUNTIME,
            xnnpack=partitioner == "xnnpack",
        )

    @classmethod
    def check_profile(cls, context: ProfileContext) -> None:
        if context.format != "executorch":
            return
        profile = context.profile
        if context.family.name not in FAMILIES_SERVED:
            raise UnsupportedError(
                f"{context.origin}: ExecuTorch builds serve the {', '.join(FAMILIES_SERVED)} "
                f"families so far, not {context.family.name}; pick an onnx, openvino or coreml "
                "profile for it"
            )
        if profile.shapes.dynamic_resolution:
            raise UnsupportedError(
                f"{context.origin}: ExecuTorch programs are built here for one resolution "
                "(a dynamic batch is bounded by shapes.max_batch_size); set "
                "shapes.dynamic_resolution = false"
            )
