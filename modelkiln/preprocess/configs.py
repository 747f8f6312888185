"""transformers' preprocessor_config.json and timm's data configs, read into the values of an
ImagePreprocessor (the class's from_hf_config / from_timm_data_config)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, cast

from modelkiln.errors import InputError, SourceError, UnsupportedError
from modelkiln.preprocess.checks import (
    PIL_RESAMPLE,
    RESAMPLE_FROM_CODE,
    Interpolation,
    ResizeMode,
    finite_float,
    hw,
    is_int,
    triple,
)

# transformers' ViTImageProcessor defaults, used for keys a preprocessor_config.json leaves out.
HF_DEFAULT_SIZE = (224, 224)
HF_DEFAULT_MEAN_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Class defaults that differ from ViT's, for the processors this module is meant to read.
HF_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DeiTImageProcessor": {
        "size": {"height": 256, "width": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
    },
    "CLIPImageProcessor": {
        "size": {"shortest_edge": 224},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
    },
}
# Processors whose integer "size" means the shortest edge (their class has default_to_square=False).
HF_INT_SIZE_IS_SHORTEST_EDGE = frozenset(
    {"CLIPImageProcessor", "ChineseCLIPImageProcessor", "BitImageProcessor"}
)
# timm's defaults for keys a data config leaves out (timm.data.constants).
TIMM_DEFAULT_MEAN = (0.485, 0.456, 0.406)
TIMM_DEFAULT_STD = (0.229, 0.224, 0.225)
TIMM_DEFAULT_CROP_PCT = 0.875


# --- transformers config parsing ---------------------------------------------------------


def reject_hf_extras(config: Mapping[str, Any]) -> None:
    if config.get("crop_pct") is not None:
        raise UnsupportedError(
            "preprocessor_config.json sets 'crop_pct' (ConvNeXT-style resize then crop), "
            "which is not supported"
        )
    if config.get("do_pad"):
        raise UnsupportedError("preprocessor_config.json sets 'do_pad', which is not supported")


def hf_processor_kind(config: Mapping[str, Any]) -> str:
    """The processor class name, without backend suffixes; legacy FeatureExtractor names mapped."""
    kind = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
    for suffix in ("Fast", "Pil"):
        kind = kind.removesuffix(suffix)
    if kind.endswith("FeatureExtractor"):
        kind = kind.removesuffix("FeatureExtractor") + "ImageProcessor"
    return kind


def hf_with_defaults(
    config: Mapping[str, Any], kind: str, default_image_size: tuple[int, int] | None
) -> dict[str, Any]:
    """The config over its class's defaults; transformers treats null values as absent too."""
    given = {key: value for key, value in config.items() if value is not None}
    if "size" not in given and default_image_size is not None:
        given["size"] = {"height": default_image_size[0], "width": default_image_size[1]}
    return {**HF_CLASS_DEFAULTS.get(kind, {}), **given}


def hf_flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SourceError(f"preprocessor_config.json '{key}' must be true or false, got {value!r}")
    return value


def hf_resize(config: Mapping[str, Any], kind: str) -> tuple[ResizeMode, Any]:
    """Resize mode and raw size value; the dataclass validates the value."""
    if not hf_flag(config, "do_resize", True):
        return "none", None
    size = config.get("size")
    if size is None:
        return "exact", HF_DEFAULT_SIZE
    if isinstance(size, int) and kind in HF_INT_SIZE_IS_SHORTEST_EDGE:
        return "shortest_edge", size
    if isinstance(size, Mapping):
        given = {key: value for key, value in size.items() if value is not None}
        if set(given) == {"height", "width"}:
            return "exact", (given["height"], given["width"])
        if set(given) == {"shortest_edge"}:
            return "shortest_edge", given["shortest_edge"]
        raise UnsupportedError(
            f"preprocessor_config.json 'size' {dict(size)} is not supported; expected "
            '{"height": H, "width": W} or {"shortest_edge": N}'
        )
    if is_int(size) or isinstance(size, Sequence):
        return "exact", size
    raise SourceError(f"preprocessor_config.json 'size' is malformed: {size!r}")


def hf_crop(config: Mapping[str, Any]) -> Any:
    if not hf_flag(config, "do_center_crop", False):
        return None
    crop = config.get("crop_size")
    if crop is None:
        raise SourceError("preprocessor_config.json sets 'do_center_crop' but has no 'crop_size'")
    if isinstance(crop, Mapping):
        if set(crop) != {"height", "width"}:
            raise SourceError(
                f"preprocessor_config.json 'crop_size' must have height and width, got {crop!r}"
            )
        return crop["height"], crop["width"]
    return crop  # An int (square) or a pair; the dataclass validates it.


def hf_interpolation(resample: object) -> Interpolation:
    if is_int(resample) and int(resample) in RESAMPLE_FROM_CODE:
        return RESAMPLE_FROM_CODE[int(resample)]
    if isinstance(resample, str) and resample.lower() in PIL_RESAMPLE:
        return cast("Interpolation", resample.lower())
    raise SourceError(
        f"preprocessor_config.json 'resample' must be a PIL filter code 0-5, got {resample!r}"
    )


def hf_rescale_factor(config: Mapping[str, Any]) -> Any:
    value = config.get("rescale_factor")
    return 1 / 255 if value is None else value


def hf_stats(config: Mapping[str, Any], key: str) -> Any:
    value = config.get(key, HF_DEFAULT_MEAN_STD)
    if value is None:
        return HF_DEFAULT_MEAN_STD
    return (value,) * 3 if isinstance(value, numbers.Real) else value


# --- timm config parsing -----------------------------------------------------------------


def timm_crop_pct(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise SourceError(f"timm data config 'crop_pct' must be a positive number, got {value!r}")
    return float(value)


def timm_image_size(input_size: object) -> tuple[int, int]:
    if is_int(input_size):
        return int(input_size), int(input_size)
    if isinstance(input_size, str) or not isinstance(input_size, Sequence):
        raise SourceError(f"timm data config 'input_size' is malformed: {input_size!r}")
    if len(input_size) not in (2, 3):
        raise SourceError(f"timm data config 'input_size' is malformed: {input_size!r}")
    if len(input_size) == 3 and input_size[0] != 3:
        raise UnsupportedError(
            f"timm model takes {input_size[0]}-channel input {tuple(input_size)}; "
            "only 3-channel RGB models are supported"
        )
    try:
        return hw("input_size", list(input_size[-2:]))
    except InputError as error:
        raise SourceError(f"timm data config {error}") from error


def timm_interpolation(name: object) -> Interpolation:
    if not isinstance(name, str) or name not in PIL_RESAMPLE:
        raise SourceError(
            f"timm data config 'interpolation' must be one of {', '.join(PIL_RESAMPLE)}, "
            f"got {name!r}"
        )
    return cast("Interpolation", name)


def timm_resize(
    crop_mode: object, scale: tuple[int, int], mean: object
) -> tuple[ResizeMode, tuple[int, int] | int, tuple[int, int, int]]:
    """Resize mode, size and pad value of timm's eval transform for one crop mode."""
    if crop_mode in (None, "center"):
        # timm passes an int (shortest-edge Resize) only when the scale size is square.
        if scale[0] == scale[1]:
            return "shortest_edge", scale[0], (0, 0, 0)
        return "cover", scale, (0, 0, 0)
    if crop_mode == "squash":
        return "exact", scale, (0, 0, 0)
    if crop_mode == "border":
        channels = triple("mean", mean, finite_float)
        fill = (round(255 * channels[0]), round(255 * channels[1]), round(255 * channels[2]))
        return "contain", scale, fill
    raise UnsupportedError(
        f"timm crop_mode {crop_mode!r} is not supported; supported: center, squash, border"
    )
