"""What a component is: its tensors and (at build time) the torch module that computes them.

`TensorSpec` travels into the manifest and is used by every runtime to validate feeds, so this
module must not import torch; `ComponentSpec.module` only *returns* a torch module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln.errors import ArtifactError, InputError

if TYPE_CHECKING:
    import torch

Dim = int | str  # a fixed size, or a symbolic name ("batch") bound per feed


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[Dim, ...]
    # Logits get a top-1 agreement check during validation.
    is_logits: bool = False
    # [low, high) of random test values (token ids, timesteps); None: standard normal floats.
    value_range: tuple[float, float] | None = None
    # An input a caller may leave out: the model holds a default (zeros at size 1 along each
    # symbolic dim; a run-time LoRA's matrices, which default to no LoRA).
    optional: bool = False

    @property
    def symbolic_dims(self) -> tuple[str, ...]:
        return tuple(d for d in self.shape if isinstance(d, str))

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def random(self, dims: Mapping[str, int], rng: np.random.Generator) -> np.ndarray:
        """A random array of this spec's dtype and shape, for validation and export."""
        shape = self.concrete_shape(dims)
        floating = np.issubdtype(np.dtype(self.dtype), np.floating)
        if self.value_range is None:
            if floating:
                return np.asarray(rng.standard_normal(shape), dtype=self.dtype)
            return np.asarray(rng.integers(0, 2, size=shape), dtype=self.dtype)
        low, high = self.value_range
        if floating:
            return np.asarray(rng.uniform(low, high, size=shape), dtype=self.dtype)
        return np.asarray(rng.integers(int(low), int(high), size=shape), dtype=self.dtype)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.is_logits:
            data["is_logits"] = True
        if self.value_range is not None:
            data["value_range"] = list(self.value_range)
        if self.optional:
            data["optional"] = True
        return data

    def default(self) -> np.ndarray:
        """What an optional input is when left out: zeros, size 1 along symbolic dims."""
        return np.zeros(tuple(d if isinstance(d, int) else 1 for d in self.shape), self.dtype)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        try:
            value_range = data.get("value_range")
            return cls(
                str(data["dtype"]),
                tuple(data["shape"]),
                bool(data.get("is_logits", False)),
                (value_range[0], value_range[1]) if value_range is not None else None,
                bool(data.get("optional", False)),
            )
        except (KeyError, TypeError) as error:
            raise ArtifactError(f"malformed tensor spec in manifest: {dict(data)!r}") from error


def check_feeds(feeds: Mapping[str, Any], specs: Mapping[str, TensorSpec]) -> dict[str, np.ndarray]:
    """Validate names, dtypes and shapes of a feed; symbolic dims must agree across inputs.
    Optional inputs may be left out (the result then lacks them too)."""
    missing = [name for name, spec in specs.items() if name not in feeds and not spec.optional]
    unexpected = [name for name in feeds if name not in specs]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if unexpected:
            parts.append(f"unexpected input(s) {', '.join(map(repr, unexpected))}")
        raise InputError(f"{' and '.join(parts)}; this model takes: {', '.join(specs)}")
    bound: dict[str, tuple[int, str]] = {}
    checked: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        if name not in feeds:
            continue  # optional, left out
        array = feeds[name]
        if not isinstance(array, np.ndarray):
            raise InputError(
                f"input '{name}' is a {type(array).__name__}, expected a numpy array of "
                f"{spec.dtype}"
            )
        if array.dtype != np.dtype(spec.dtype):
            raise InputError(
                f"input '{name}' has dtype {array.dtype}, expected {spec.dtype} "
                f"(convert with .astype(np.{spec.dtype}))"
            )
        if array.ndim != len(spec.shape):
            raise InputError(
                f"input '{name}' has shape {array.shape}, expected rank {len(spec.shape)} "
                f"{_shape_text(spec.shape)}"
            )
        for axis, (expected, actual) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if isinstance(expected, int):
                if expected != actual:
                    raise InputError(
                        f"input '{name}' has shape {array.shape}, expected "
                        f"{_shape_text(spec.shape)} (axis {axis} must be {expected})"
                    )
            elif expected in bound and bound[expected][0] != actual:
                size, other = bound[expected]
                raise InputError(
                    f"input '{name}' has {expected}={actual} but '{other}' has {expected}={size}"
                )
            else:
                bound[expected] = (actual, name)
        checked[name] = np.require(
            array, requirements="C"
        )  # keeps 0-d (ascontiguousarray does not)
    return checked


def conform(value: Any, spec: TensorSpec) -> np.ndarray:
    """`value` in the dtype and rank `spec` asks for: a scalar and a one-element vector are the
    same value (a timestep), and integers are rounded, not truncated."""
    array = np.asarray(value)
    target = np.dtype(spec.dtype)
    if np.issubdtype(target, np.integer) and np.issubdtype(array.dtype, np.floating):
        array = np.rint(array)
    array = array.astype(target, copy=False)
    if array.ndim != len(spec.shape) and array.size == 1 and all(d == 1 for d in spec.shape):
        array = array.reshape((1,) * len(spec.shape))
    return array


def _shape_text(shape: tuple[Dim, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


@dataclass(frozen=True)
class ComponentSpec:
    """One exportable piece of a model (vision_model, text_encoder, unet, vae_decoder, ...)."""

    name: str
    # Returns an eval-mode wrapper whose forward takes the inputs positionally, in order, and
    # returns a tuple of the outputs in order.
    module: Callable[[], torch.nn.Module]
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    # Saves the torch reference in a layout the family can load back (the `torch` format).
    save_reference: Callable[[Path], None]
    # Sub-directory inside the artifact ("" = the artifact root, as optimum does for ViT).
    path: str = ""
    # Where the torch format keeps it, when that differs (diffusers keeps both VAE halves in
    # "vae"); None: `path`.
    reference_path: str | None = None
    # Its batch per image batch: 2 for a UNet that runs the CFG-doubled batch.
    batch_factor: int = 1
    # For a memory-lean ONNX export: the wrapper built on the meta device, and the safetensors
    # files holding its weights under the same names (minus the wrapper's "model." prefix).
    meta_module: Callable[[], torch.nn.Module] | None = None
    checkpoint: tuple[Path, ...] = ()
    # config.json the ONNX and OpenVINO formats keep beside the component (optimum's layout).
    config_file: bytes | None = None
    # Default max-abs tolerance of an fp32 export against torch (optimum's ATOL_FOR_VALIDATION).
    atol: float = 1e-4
    # Default dims for symbolic axes other than the batch.
    default_dims: Mapping[str, int] = field(default_factory=dict)
    # Symbolic dims every export keeps dynamic, whatever the profile's shapes say (the rank
    # of run-time LoRA matrices, which differs per LoRA).
    dynamic_dims: frozenset[str] = frozenset()
    # The module without the build's approximations (merged tokens), where `module` makes
    # some: the torch reference the end-to-end gate compares with. None: `module` is exact.
    exact_module: Callable[[], torch.nn.Module] | None = None

    def dummy_inputs(self, dims: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        all_dims = {**self.default_dims, **dims}
        return {name: spec.random(all_dims, rng) for name, spec in self.inputs.items()}
