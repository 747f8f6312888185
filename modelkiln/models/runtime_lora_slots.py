"""Run-time LoRA slots ([runtime_lora]) of SD's and SDXL's UNets: the profile's rules and the
denoiser's spec with a slot in every target layer. Torch-free until a module is built."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from modelkiln.errors import ProfileError, UnsupportedError
from modelkiln.models.diffusion_signatures import EXAMPLE_RANK, LORA_RANK, lora_slot_inputs
from modelkiln.specs import ComponentSpec

if TYPE_CHECKING:
    from modelkiln.profiles import Profile


def with_lora_slots(spec: ComponentSpec, folder: Path, targets: Sequence[str]) -> ComponentSpec:
    """The denoiser with a LoRA slot in every target layer: A and B as optional inputs."""
    from modelkiln.models import stable_diffusion_modules as modules

    layers = modules.lora_slot_layers(modules.meta_component(folder), targets)
    if not layers:
        raise ProfileError(
            f"runtime_lora.targets {list(targets)} name no Linear layer of {folder}; name its "
            "layers or their last parts (to_q, to_k, to_v, to_out.0, ff.net.2, ...)"
        )
    module, meta_module = spec.module, spec.meta_module
    return replace(
        spec,
        module=lambda: modules.LoraSlots(module(), list(layers)),
        meta_module=(lambda: modules.LoraSlots(meta_module(), list(layers)))
        if meta_module is not None
        else None,
        inputs={**spec.inputs, **lora_slot_inputs(layers)},
        default_dims={**spec.default_dims, LORA_RANK: EXAMPLE_RANK},
        dynamic_dims=spec.dynamic_dims | {LORA_RANK},
    )


def check_runtime_lora(profile: Profile, denoiser: str, origin: str) -> None:
    """Slots are optional inputs with defaults, which the ONNX export writes and ONNX
    Runtime runs (as LoRA adapters); the LoRA adds to fp32 weights that no scheme changed."""
    view = profile.for_component(denoiser)
    if profile.export.format != "onnx" or profile.runtime.name not in ("auto", "onnxruntime"):
        raise UnsupportedError(
            f"{origin}: [runtime_lora] is built for the onnx format run by ONNX Runtime, not "
            f"{profile.export.format} on {profile.runtime.name}; fuse LoRAs at build ([[lora]] "
            "or kiln build --lora) for other backends"
        )
    if view.precision.weights != "fp32" or view.quantization.scheme != "none":
        raise UnsupportedError(
            f"{origin}: [runtime_lora] needs the {denoiser} in fp32 without a quantization "
            f"scheme (it has {view.precision.weights}, scheme {view.quantization.scheme}); "
            "fuse LoRAs at build ([[lora]]) for a quantized or fp16 build"
        )
    if not profile.runtime_lora.targets:
        raise ProfileError(f"{origin}: runtime_lora.targets is empty; name the layers to adapt")


__all__ = ["check_runtime_lora", "with_lora_slots"]
