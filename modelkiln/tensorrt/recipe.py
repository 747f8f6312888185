"""The engine recipe: what the TensorRT builder is asked for, as plain frozen data.

Derived from the profile and the component's spec; recorded in engine.json beside the engine;
hashed into the engine cache key; applied to a builder config by `configure`, which takes the
`tensorrt` module as an argument (the tests pass a recording fake).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modelkiln.errors import ArtifactError, ExportError, UnsupportedError
from modelkiln.exporters.base import dim_ranges, export_dims, resolve_dim
from modelkiln.tensorrt.settings import TensorRTSettings

if TYPE_CHECKING:
    from modelkiln.profiles import Profile
    from modelkiln.specs import ComponentSpec

# Part of every cache key: bump it when the translation below changes, so that engines built
# from an older recipe are not taken from the cache for a newer one.
RECIPE_VERSION = 1
# BuilderFlag names per compute precision. fp32 also clears TF32 (on by default), which rounds
# matmul and conv inputs to 10 mantissa bits: fp32 engines should match torch fp32.
COMPUTE_FLAGS: dict[str, tuple[str, ...]] = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}
# Quantization schemes the ONNX can carry (modelkiln.quantize.tensorrt) and the flags they
# need on top: int8 Q/DQ runs int8 kernels where the graph says so, the rest in the compute
# precision; int4 is weight-only (DequantizeLinear feeding MatMul) and computes in that too.
SCHEME_FLAGS: dict[str, tuple[str, ...]] = {
    "none": (),
    "int8-static": ("INT8",),
    "int4-weights": (),
}
MEGABYTE = 1 << 20


@dataclass(frozen=True)
class ShapeRange:
    """One dynamic input's shapes in the optimization profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class EngineRecipe:
    compute: str  # fp32 | fp16 | bf16
    scheme: str  # the quantization the ONNX carries
    flags: tuple[str, ...]  # BuilderFlag names to set
    cleared_flags: tuple[str, ...]  # BuilderFlag names to clear
    # One optimization profile: a shape range per input with a dynamic dim (none: static).
    shapes: tuple[ShapeRange, ...]
    workspace_bytes: int | None  # None: TensorRT's default (the whole device)
    optimization_level: int

    def to_json(self) -> dict[str, Any]:
        return {
            "compute": self.compute,
            "scheme": self.scheme,
            "flags": list(self.flags),
            "cleared_flags": list(self.cleared_flags),
            "shapes": {
                r.name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)}
                for r in self.shapes
            },
            "workspace_bytes": self.workspace_bytes,
            "optimization_level": self.optimization_level,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EngineRecipe:
        try:
            shapes = tuple(
                ShapeRange(name, tuple(r["min"]), tuple(r["opt"]), tuple(r["max"]))
                for name, r in data["shapes"].items()
            )
            return cls(
                compute=str(data["compute"]),
                scheme=str(data["scheme"]),
                flags=tuple(data["flags"]),
                cleared_flags=tuple(data["cleared_flags"]),
                shapes=shapes,
                workspace_bytes=data["workspace_bytes"],
                optimization_level=int(data["optimization_level"]),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ArtifactError(
                f"malformed TensorRT engine recipe {dict(data)!r}; rebuild the artifact"
            ) from error


def recipe_for(spec: ComponentSpec, profile: Profile) -> EngineRecipe:
    """The recipe of one component's engine; `profile` is the component's own view of it."""
    flags, cleared = builder_flags(profile.precision.compute, profile.quantization.scheme)
    settings = TensorRTSettings.of(profile)
    return EngineRecipe(
        compute=profile.precision.compute,
        scheme=profile.quantization.scheme,
        flags=flags,
        cleared_flags=cleared,
        shapes=shape_ranges(spec, profile),
        workspace_bytes=None if settings.workspace_mb is None else settings.workspace_mb * MEGABYTE,
        optimization_level=settings.optimization_level,
    )


def builder_flags(compute: str, scheme: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(flags to set, flags to clear) for a compute precision and a quantization scheme."""
    if compute not in COMPUTE_FLAGS:
        raise UnsupportedError(
            f"TensorRT engines compute in {', '.join(COMPUTE_FLAGS)}, not '{compute}'"
        )
    if scheme not in SCHEME_FLAGS:
        raise UnsupportedError(
            f"TensorRT engines take quantization schemes {', '.join(SCHEME_FLAGS)}, not '{scheme}'"
        )
    flags = tuple(sorted({*COMPUTE_FLAGS[compute], *SCHEME_FLAGS[scheme]}))
    return flags, ("TF32",) if compute == "fp32" else ()


def shape_ranges(spec: ComponentSpec, profile: Profile) -> tuple[ShapeRange, ...]:
    """min/opt/max shapes of every input with a dynamic dim (exporters.base.dim_ranges)."""
    example, _ = export_dims(spec, profile)
    bounds = dim_ranges(spec, profile)
    opt = {**example, **{name: size for name, (_, size, _) in bounds.items()}}
    low = {**opt, **{name: least for name, (least, _, _) in bounds.items()}}
    high = {**opt, **{name: most for name, (_, _, most) in bounds.items()}}
    return tuple(
        ShapeRange(
            name,
            _concrete(spec, name, tensor.shape, low),
            _concrete(spec, name, tensor.shape, opt),
            _concrete(spec, name, tensor.shape, high),
        )
        for name, tensor in spec.inputs.items()
        if {d.split()[0] for d in tensor.symbolic_dims} & set(bounds)
    )


def _concrete(
    spec: ComponentSpec, name: str, shape: tuple[int | str, ...], sizes: Mapping[str, int]
) -> tuple[int, ...]:
    dims = [resolve_dim(d, sizes) for d in shape]
    if any(isinstance(d, str) for d in dims):
        raise ExportError(
            f"{spec.name}: input '{name}' has dims {list(shape)} with no size for "
            f"{[d for d in dims if isinstance(d, str)]}; the component's default_dims must "
            "name every symbolic dim"
        )
    return tuple(int(d) for d in dims)


def cache_key(gpu_name: str, trt_version: str, onnx_sha256: str, recipe: EngineRecipe) -> str:
    """The engine cache key: an engine fits one GPU model and TensorRT version, and is built
    from one ONNX with one recipe. sha256 of their canonical JSON."""
    document = {
        "recipe_version": RECIPE_VERSION,
        "gpu": gpu_name,
        "tensorrt": trt_version,
        "onnx_sha256": onnx_sha256,
        "recipe": recipe.to_json(),
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def configure(trt: Any, builder: Any, config: Any, recipe: EngineRecipe) -> None:
    """Apply the recipe to a TensorRT IBuilderConfig (`trt` is the tensorrt module)."""
    for name in recipe.flags:
        config.set_flag(_flag(trt, name))
    for name in recipe.cleared_flags:
        config.clear_flag(_flag(trt, name))
    if recipe.shapes:
        optimization_profile = builder.create_optimization_profile()
        for shapes in recipe.shapes:
            optimization_profile.set_shape(shapes.name, shapes.min, shapes.opt, shapes.max)
        if config.add_optimization_profile(optimization_profile) < 0:
            raise ExportError(
                "TensorRT rejected the optimization profile "
                f"{recipe.to_json()['shapes']} (run with -v for its log)"
            )
    if recipe.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, recipe.workspace_bytes)
    config.builder_optimization_level = recipe.optimization_level


def _flag(trt: Any, name: str) -> Any:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        # TensorRT 11 dropped the weakly typed precision flags for strongly typed networks.
        raise UnsupportedError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no BuilderFlag.{name}; "
            "modelkiln builds engines with TensorRT 10: pip install 'tensorrt>=10,<11'"
        )
    return flag
