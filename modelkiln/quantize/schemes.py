"""Quantization schemes as typed configs, torchao-style: one small frozen dataclass per scheme.

A profile's ``[quantization]`` names a scheme and sets its keys; the scheme's config class
parses them (modelkiln.profiles.parse_section: unknown keys and bad values raise with their
key path). The configs say *what* to do, format-agnostic; each backend's quantizer registers
a handler per (config, format) that says *how* with its own tooling (modelkiln.quantize.handlers).
Adding a scheme: a config class here (or anywhere, decorated with `@scheme`) and its handlers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, TypeVar

from modelkiln.errors import ProfileError
from modelkiln.registry import Registry

C = TypeVar("C", bound=type["SchemeConfig"])


@dataclass(frozen=True)
class SchemeConfig:
    """What a scheme does; subclasses add their keys with the defaults a profile gets."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Quantizes activations: needs real inputs of each component ([calibration]).
    calibrated: ClassVar[bool] = False
    # Bits of the quantized weights (for reports: how much accuracy a scheme may cost).
    weight_bits: ClassVar[int]

    def check(self, origin: str) -> None:
        """Ranges of the scheme's own keys; raise ProfileError."""


SCHEMES: Registry[type[SchemeConfig]] = Registry("quantization scheme", {})


def scheme(cls: C) -> C:
    """Register a config class under its `name` (a class decorator)."""
    SCHEMES.register(cls.name, cls)
    return cls


@scheme
@dataclass(frozen=True)
class Int8Weights(SchemeConfig):
    name: ClassVar[str] = "int8-weights"
    summary: ClassVar[str] = "int8 weights, one scale per output channel; float activations"
    weight_bits: ClassVar[int] = 8
    symmetric: bool = False  # no zero point


@scheme
@dataclass(frozen=True)
class Int8Dynamic(SchemeConfig):
    name: ClassVar[str] = "int8-dynamic"
    summary: ClassVar[str] = "int8 weights, activations quantized at run time per call"
    weight_bits: ClassVar[int] = 8
    symmetric: bool = False
    per_channel: bool = False  # one weight scale per output channel, else per tensor


@scheme
@dataclass(frozen=True)
class Int8Static(SchemeConfig):
    name: ClassVar[str] = "int8-static"
    summary: ClassVar[str] = "int8 weights and activations, activation ranges calibrated"
    calibrated: ClassVar[bool] = True
    weight_bits: ClassVar[int] = 8
    symmetric: bool = False
    per_channel: bool = False
    # How activation ranges are taken from the calibration outputs (ONNX Runtime's calibrators).
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    # nncf's transformer-aware scheme (keeps softmax, layer norm and the like in floating
    # point) or its default for convolutional networks.
    model_type: Literal["transformer", "default"] = "transformer"


@scheme
@dataclass(frozen=True)
class Int8Hybrid(SchemeConfig):
    name: ClassVar[str] = "int8-hybrid"
    summary: ClassVar[str] = (
        "int8 activations and weights in the attention and convolutions, int8 weights "
        "elsewhere (optimum-intel's UNet scheme)"
    )
    calibrated: ClassVar[bool] = True
    weight_bits: ClassVar[int] = 8
    symmetric: bool = False
    model_type: Literal["transformer", "default"] = "transformer"
    # The MatMuls' weights: int8 (optimum-intel's, half the bytes of fp16) or kept floating
    # point, bf16 at run time where the CPU has it: a bf16 matmul on AMX runs faster than one
    # that first decompresses int8 weights (an SD-1.5-sized UNet step 5.7 %, docs/performance.md).
    matmul_weights: Literal["int8", "float"] = "int8"


@dataclass(frozen=True)
class _FourBit(SchemeConfig):
    weight_bits: ClassVar[int] = 4
    group_size: int = 128  # weights per scale along the input channels (the block size)
    # OpenVINO: the share of the layers in 4 bits (nncf keeps the rest in int8).
    ratio: float = 1.0

    def check(self, origin: str) -> None:
        if self.group_size < 1:
            raise ProfileError(
                f"{origin}: quantization.group_size must be >= 1, got {self.group_size}"
            )
        if not 0.0 < self.ratio <= 1.0:
            raise ProfileError(f"{origin}: quantization.ratio must be in (0, 1], got {self.ratio}")


@scheme
@dataclass(frozen=True)
class Int4Weights(_FourBit):
    name: ClassVar[str] = "int4-weights"
    summary: ClassVar[str] = "int4 weights in blocks of group_size; float activations"
    symmetric: bool = False


@scheme
@dataclass(frozen=True)
class NF4Weights(_FourBit):
    name: ClassVar[str] = "nf4-weights"
    summary: ClassVar[str] = "NormalFloat-4 weights (QLoRA's levels) in blocks of group_size"


@scheme
@dataclass(frozen=True)
class Palettize4Weights(SchemeConfig):
    name: ClassVar[str] = "palettize4-weights"
    summary: ClassVar[str] = "each weight an index into a 16-entry lookup table (Core ML)"
    weight_bits: ClassVar[int] = 4
    # How the 16 lookup-table entries are chosen.
    palettization: Literal["kmeans", "uniform"] = "kmeans"


__all__ = [
    "SCHEMES",
    "Int4Weights",
    "Int8Dynamic",
    "Int8Hybrid",
    "Int8Static",
    "Int8Weights",
    "NF4Weights",
    "Palettize4Weights",
    "SchemeConfig",
    "scheme",
]
