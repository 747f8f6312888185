"""LoRAs chosen at run time, torch-free: the slots a UNet built with [runtime_lora] has, the
matrices a LoRA puts in them, and ONNX Runtime adapter files that hold those matrices.

A slot is a layer whose output gains x @ A.T @ B.T, A (rank, in) and B (out, rank) being
optional inputs of the UNet named `<layer>.lora_A` / `<layer>.lora_B` (zeros: no LoRA).
Several LoRAs at once are one LoRA of their summed rank: their A stacked, their B (each times
its scale) side by side, so that B @ A = sum of scale_i * B_i @ A_i, exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modelkiln.errors import ArtifactError, InputError, UnsupportedError, first_line

if TYPE_CHECKING:
    from modelkiln.specs import TensorSpec

LORA_RANK = "lora_rank"  # the symbolic dim of every slot's rank
DOWN, UP = ".lora_A", ".lora_B"
ADAPTER_SUFFIX = ".onnx_adapter"


def slot_inputs(layer: str) -> tuple[str, str]:
    """The UNet inputs of a slot layer: its A (down) and B (up) matrices."""
    return layer + DOWN, layer + UP


def slot_layers(inputs: Mapping[str, TensorSpec]) -> dict[str, tuple[int, int]]:
    """Slot layer -> (in_features, out_features), read from a UNet's input specs."""
    layers = {}
    for name, spec in inputs.items():
        if name.endswith(DOWN) and spec.optional:
            layer = name.removesuffix(DOWN)
            out_features = inputs[layer + UP].shape[0]
            layers[layer] = (int(spec.shape[1]), int(out_features))
    return layers


@dataclass(frozen=True)
class LoraMatrices:
    """One LoRA as its slots take it: layer -> (A, B), B with the LoRA's own alpha / rank
    applied (what diffusers multiplies by), not yet the user's scale."""

    source: str
    layers: Mapping[str, tuple[np.ndarray, np.ndarray]]

    @property
    def rank(self) -> int:
        return max(down.shape[0] for down, _ in self.layers.values())


def slot_feeds(
    slots: Mapping[str, tuple[int, int]], loras: Sequence[tuple[LoraMatrices, float]]
) -> dict[str, np.ndarray]:
    """Every slot's A and B for `loras` at their scales, each LoRA padded with zeros to its
    largest rank (and in layers it leaves alone); {} for no LoRA (the UNet's defaults)."""
    if not loras:
        return {}
    for lora, _ in loras:
        _check_fits(lora, slots)
    feeds = {}
    for layer, (in_features, out_features) in slots.items():
        downs, ups = [], []
        for lora, scale in loras:
            down = np.zeros((lora.rank, in_features), np.float32)
            up = np.zeros((out_features, lora.rank), np.float32)
            if layer in lora.layers:
                a, b = lora.layers[layer]
                down[: len(a)] = a
                up[:, : b.shape[1]] = b * np.float32(scale)
            downs.append(down)
            ups.append(up)
        down_name, up_name = slot_inputs(layer)
        feeds[down_name] = np.ascontiguousarray(np.concatenate(downs, axis=0))
        feeds[up_name] = np.ascontiguousarray(np.concatenate(ups, axis=1))
    return feeds


def _check_fits(lora: LoraMatrices, slots: Mapping[str, tuple[int, int]]) -> None:
    outside = sorted(set(lora.layers) - set(slots))
    if outside:
        raise UnsupportedError(
            f"LoRA {lora.source} adapts {len(outside)} layer(s) this artifact has no run-time "
            f"slot for ({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}); "
            "rebuild with those layers in runtime_lora.targets, or fuse it at build (--lora)"
        )
    for layer, (down, up) in lora.layers.items():
        in_features, out_features = slots[layer]
        if down.shape[1] != in_features or up.shape[0] != out_features:
            raise UnsupportedError(
                f"LoRA {lora.source}: layer {layer} is {down.shape[1]} -> {up.shape[0]} in the "
                f"LoRA but {in_features} -> {out_features} in this UNet; it is a LoRA for "
                "another model"
            )


def write_adapter(arrays: Mapping[str, np.ndarray], path: Path) -> Path:
    """Slot feeds (slot_feeds: every slot, scales applied) as an ONNX Runtime adapter file:
    what `LoraAdapter` + `RunOptions.add_active_adapter` run with the UNet, in any ORT API."""
    from modelkiln.outputs import atomic_file
    from modelkiln.runtimes.onnxruntime import export_adapter

    if path.suffix != ADAPTER_SUFFIX:
        raise InputError(f"name the adapter file {path.stem}{ADAPTER_SUFFIX}, not {path.name}")
    with atomic_file(path) as staging:
        export_adapter(arrays, staging)
    return path


def read_adapter(path: Path) -> LoraMatrices:
    """An adapter file `write_adapter` wrote, back as one LoRA's matrices (its scales
    already applied: a scale given with it multiplies them)."""
    import onnxruntime as ort

    try:
        parameters = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as error:  # onnxruntime raises its own untyped exceptions
        raise ArtifactError(
            f"{path} is not a readable ONNX Runtime adapter ({first_line(error)}); write it "
            "again with kiln lora-adapter"
        ) from error
    arrays = {name: value.numpy() for name, value in parameters.items()}
    layers = {}
    for name, down in arrays.items():
        if name.endswith(DOWN):
            layer = name.removesuffix(DOWN)
            up = arrays.get(layer + UP)
            if up is None:
                raise InputError(f"{path}: {name} has no {layer + UP}; write it again")
            if np.any(down) or np.any(up):  # all-zero: a slot the LoRA leaves alone
                layers[layer] = (down, up)
    return LoraMatrices(str(path), layers)
