"""The preprocessor's vocabulary (resize modes, interpolations, crop conventions) and the
checks of its values: InputError naming the key; callers re-raise as their own kind."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias, TypeGuard, get_args

from PIL import Image

from modelkiln.errors import InputError, did_you_mean

ResizeMode: TypeAlias = Literal["none", "exact", "shortest_edge", "cover", "contain"]
Interpolation: TypeAlias = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
CropConvention: TypeAlias = Literal["torchvision", "transformers"]

RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
CROP_CONVENTIONS: tuple[str, ...] = get_args(CropConvention)

PIL_RESAMPLE: dict[Interpolation, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# transformers stores PIL's integer codes in preprocessor_config.json.
RESAMPLE_FROM_CODE: dict[int, Interpolation] = {
    int(code): name for name, code in PIL_RESAMPLE.items()
}


def choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise InputError(f"'{name}' must be one of {', '.join(choices)}, got {value!r}{hint}")
    return value


def is_int(value: object) -> TypeGuard[int]:
    """Integers, numpy's included; bools are not sizes."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value: object) -> int:
    if not is_int(value) or int(value) < 1:
        raise InputError(f"'{name}' must be a positive integer, got {value!r}")
    return int(value)


def hw(name: str, value: object) -> tuple[int, int]:
    """(height, width) from a pair or a single int meaning a square."""
    if is_int(value):
        side = positive_int(name, value)
        return side, side
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise InputError(f"'{name}' must be [height, width], got {value!r}")
    return positive_int(name, value[0]), positive_int(name, value[1])


def check_size(mode: object, size: object) -> tuple[int, int] | int | None:
    if mode == "none":
        if size is not None:
            raise InputError(f"'size' must be null when resize_mode is 'none', got {size!r}")
        return None
    if mode == "shortest_edge":
        return positive_int("size", size)
    return hw("size", size)


def finite_float(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise InputError(f"'{name}' must be a finite number, got {value!r}")
    return float(value)


def positive_float(name: str, value: object) -> float:
    number = finite_float(name, value)
    if number <= 0:
        raise InputError(f"'{name}' must be positive, got {value!r}")
    return number


def byte(name: str, value: object) -> int:
    if not is_int(value) or not 0 <= int(value) <= 255:
        raise InputError(f"'{name}' values must be integers in 0..255, got {value!r}")
    return int(value)


def triple(name: str, value: object, check: Callable[[str, object], Any]) -> tuple[Any, Any, Any]:
    """Three per-channel (R, G, B) values."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise InputError(f"'{name}' must hold 3 values (R, G, B), got {value!r}")
    return check(name, value[0]), check(name, value[1]), check(name, value[2])
