"""Torch-free image preprocessing that reproduces transformers' and timm's eval pipelines.

An ``ImagePreprocessor`` is resize → center crop (or pad) → ``x * rescale_factor`` → normalise,
producing float32 NCHW batches. Resizing is Pillow's ``Image.resize`` on 8-bit RGB images, which
is exactly what transformers' PIL image processors and torchvision's ``Resize`` on PIL images do,
so outputs match them to float32 rounding.

``resize_mode`` (with what ``size`` holds):

- ``"none"``: no resize (``size`` is None); transformers' ``do_resize=False``.
- ``"exact"``: resize to ``size`` = (height, width), ignoring aspect ratio.
- ``"shortest_edge"``: the short side becomes ``size`` (an int) and the long side
  ``int(size * long / short)``, as torchvision's ``Resize(int)`` and transformers'
  ``{"shortest_edge": size}``.
- ``"cover"`` / ``"contain"``: keep the aspect ratio so the image covers / fits in ``size`` =
  (height, width), rounding as timm's ``ResizeKeepRatio`` (``longest=0`` / ``longest=1``).

The center crop is taken in 8-bit pixel space; where the image is smaller than the crop it is
padded with ``pad_value``. The two libraries place the crop differently when the margin is odd:
``crop_convention="torchvision"`` (timm) offsets by ``int(round(margin / 2))`` and pads
``margin // 2`` before, ``"transformers"`` offsets by ``margin // 2`` everywhere.

Only numpy and Pillow are needed here; this module runs without torch.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeAlias, TypeGuard, cast, get_args

import numpy as np
from PIL import Image

from modelkiln.errors import (
    ArtifactError,
    InputError,
    SourceError,
    UnsupportedError,
    did_you_mean,
)
from modelkiln.images import ImageInput, load_image

logger = logging.getLogger(__name__)

ResizeMode: TypeAlias = Literal["none", "exact", "shortest_edge", "cover", "contain"]
Interpolation: TypeAlias = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
CropConvention: TypeAlias = Literal["torchvision", "transformers"]

_RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
_INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)
_CROP_CONVENTIONS: tuple[str, ...] = get_args(CropConvention)

_PIL_RESAMPLE: dict[Interpolation, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# transformers stores PIL's integer codes in preprocessor_config.json.
_RESAMPLE_FROM_CODE: dict[int, Interpolation] = {
    int(code): name for name, code in _PIL_RESAMPLE.items()
}

# transformers' ViTImageProcessor defaults, used for keys a preprocessor_config.json leaves out.
_HF_DEFAULT_SIZE = (224, 224)
_HF_DEFAULT_MEAN_STD = (0.5, 0.5, 0.5)
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Class defaults that differ from ViT's, for the processors this module is meant to read.
_HF_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
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
        "image_mean": _OPENAI_CLIP_MEAN,
        "image_std": _OPENAI_CLIP_STD,
    },
}
# Processors whose integer "size" means the shortest edge (their class has default_to_square=False).
_HF_INT_SIZE_IS_SHORTEST_EDGE = frozenset(
    {"CLIPImageProcessor", "ChineseCLIPImageProcessor", "BitImageProcessor"}
)
# timm's defaults for keys a data config leaves out (timm.data.constants).
_TIMM_DEFAULT_MEAN = (0.485, 0.456, 0.406)
_TIMM_DEFAULT_STD = (0.229, 0.224, 0.225)
_TIMM_DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize, center crop, rescale and normalise RGB images into a float32 NCHW batch.

    See the module docstring for ``resize_mode``/``size`` and ``crop_convention``. Lists are
    accepted wherever a tuple is expected and stored as tuples; invalid values raise InputError.
    """

    resize_mode: ResizeMode
    size: tuple[int, int] | int | None
    interpolation: Interpolation
    crop_size: tuple[int, int] | None
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_convention: CropConvention = "torchvision"
    pad_value: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        normalised = {
            "resize_mode": _choice("resize_mode", self.resize_mode, _RESIZE_MODES),
            "size": _check_size(self.resize_mode, self.size),
            "interpolation": _choice("interpolation", self.interpolation, _INTERPOLATIONS),
            "crop_size": None if self.crop_size is None else _hw("crop_size", self.crop_size),
            "rescale_factor": _positive_float("rescale_factor", self.rescale_factor),
            "mean": _triple("mean", self.mean, _finite_float),
            "std": _triple("std", self.std, _positive_float),
            "crop_convention": _choice("crop_convention", self.crop_convention, _CROP_CONVENTIONS),
            "pad_value": _triple("pad_value", self.pad_value, _byte),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)  # Frozen: store the normalised values.

    # --- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (lists, not tuples) that ``from_dict`` reads back."""
        return {
            "resize_mode": self.resize_mode,
            "size": list(self.size) if isinstance(self.size, tuple) else self.size,
            "interpolation": self.interpolation,
            "crop_size": None if self.crop_size is None else list(self.crop_size),
            "rescale_factor": self.rescale_factor,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_convention": self.crop_convention,
            "pad_value": list(self.pad_value),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImagePreprocessor:
        """Read ``to_dict``'s output; a malformed dict raises ArtifactError naming the bad key."""
        if not isinstance(data, Mapping):
            raise ArtifactError(
                f"preprocessor config must be a JSON object, got {type(data).__name__}"
            )
        known = [field.name for field in fields(cls)]
        for key in data:
            if key not in known:
                raise ArtifactError(
                    f"preprocessor config has unknown key '{key}'{did_you_mean(str(key), known)}; "
                    f"known keys: {', '.join(known)}"
                )
        defaulted = ("crop_convention", "pad_value")  # Fields with defaults may be left out.
        for key in known:
            if key not in data and key not in defaulted:
                raise ArtifactError(f"preprocessor config is missing key '{key}'")
        try:
            return cls(**dict(data))
        except InputError as error:
            raise ArtifactError(f"malformed preprocessor config: {error}") from error

    # --- transformers --------------------------------------------------------------------

    @classmethod
    def from_hf_config(
        cls,
        config: Mapping[str, Any],
        *,
        default_image_size: tuple[int, int] | None = None,
    ) -> ImagePreprocessor:
        """Parse a transformers ``preprocessor_config.json`` (ViT, DeiT, CLIP-style processors).

        Keys it leaves out (or sets to null) take the defaults of the class named by
        ``image_processor_type`` for DeiT and CLIP, else ViTImageProcessor's: resize to 224×224,
        bilinear, rescale 1/255, mean and std 0.5, no crop. ``default_image_size`` (height,
        width) replaces a missing ``size``. An integer ``size`` is a square, except for
        processors whose class reads it as the shortest edge (CLIP, Chinese-CLIP, BiT). Raises
        SourceError for malformed values and UnsupportedError for steps this class cannot do.
        """
        if not isinstance(config, Mapping):
            raise SourceError(
                f"preprocessor_config.json must be a JSON object, got {type(config).__name__}"
            )
        kind = _hf_processor_kind(config)
        config = _hf_with_defaults(config, kind, default_image_size)
        _reject_hf_extras(config)
        mode, size = _hf_resize(config, kind)
        do_rescale = _hf_flag(config, "do_rescale", True)
        do_normalize = _hf_flag(config, "do_normalize", True)
        try:
            return cls(
                resize_mode=mode,
                size=size,
                interpolation=_hf_interpolation(config.get("resample", 2)),
                crop_size=_hf_crop(config),
                rescale_factor=_hf_rescale_factor(config) if do_rescale else 1.0,
                mean=_hf_stats(config, "image_mean") if do_normalize else (0.0, 0.0, 0.0),
                std=_hf_stats(config, "image_std") if do_normalize else (1.0, 1.0, 1.0),
                crop_convention="transformers",
            )
        except InputError as error:
            raise SourceError(f"unusable preprocessor_config.json: {error}") from error

    def to_hf_config(self, *, strict: bool = True) -> dict[str, Any]:
        """A ``preprocessor_config.json`` dict that transformers reproduces this pipeline from.

        ViTImageProcessor when there is no crop, DeiTImageProcessor for a fixed resize plus crop
        and CLIPImageProcessor for a shortest-edge resize (ViT in transformers 4.x can neither
        crop nor resize by the shortest edge). transformers floors the crop offset where
        torchvision rounds; when that can shift the crop by a pixel, ``strict`` raises
        UnsupportedError, and ``strict=False`` returns the config anyway and logs a warning.
        """
        if self.resize_mode in ("cover", "contain"):
            raise UnsupportedError(
                f"resize_mode '{self.resize_mode}' (timm's ResizeKeepRatio) has no transformers "
                "image processor equivalent"
            )
        problem = self._hf_crop_problem()
        if problem and strict:
            raise UnsupportedError(
                f"{problem}; transformers cannot reproduce it exactly "
                "(pass strict=False to accept a possible one-pixel crop shift)"
            )
        if problem:
            logger.warning("preprocessor config for transformers is approximate: %s", problem)
        return self._hf_config_dict()

    def _hf_crop_problem(self) -> str | None:
        if self.crop_size is None:
            return None
        if self.pad_value != (0, 0, 0):
            return f"the crop pads with {list(self.pad_value)} where transformers pads with 0"
        if self.crop_convention == "transformers":
            return None
        if self.resize_mode == "exact" and isinstance(self.size, tuple):
            offsets_agree = all(
                _crop_offset(side, crop, "torchvision") == _crop_offset(side, crop, "transformers")
                for side, crop in zip(self.size, self.crop_size, strict=True)
            )
            if offsets_agree:
                return None
        return "the center crop rounds its offset as torchvision does, where transformers floors it"

    def _hf_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {"image_processor_type": self._hf_processor_type()}
        config["do_resize"] = self.resize_mode != "none"
        if isinstance(self.size, tuple):
            config["size"] = {"height": self.size[0], "width": self.size[1]}
        elif isinstance(self.size, int):
            config["size"] = {"shortest_edge": self.size}
        config["resample"] = int(_PIL_RESAMPLE[self.interpolation])
        config["do_center_crop"] = self.crop_size is not None
        if self.crop_size is not None:
            config["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        config["do_rescale"] = self.rescale_factor != 1.0
        config["rescale_factor"] = self.rescale_factor
        config["do_normalize"] = self.mean != (0.0, 0.0, 0.0) or self.std != (1.0, 1.0, 1.0)
        config["image_mean"] = list(self.mean)
        config["image_std"] = list(self.std)
        return config

    def _hf_processor_type(self) -> str:
        if self.resize_mode == "shortest_edge":
            return "CLIPImageProcessor"
        return "ViTImageProcessor" if self.crop_size is None else "DeiTImageProcessor"

    # --- timm ----------------------------------------------------------------------------

    @classmethod
    def from_timm_data_config(cls, data_config: Mapping[str, Any]) -> ImagePreprocessor:
        """Reproduce ``timm.data.create_transform(**data_config, is_training=False)``.

        ``data_config`` is ``timm.data.resolve_data_config(...)``'s output. Crop modes "center",
        "squash" and "border" are supported; keys the eval transform ignores are ignored here.
        """
        if not isinstance(data_config, Mapping):
            raise SourceError(
                f"timm data config must be a mapping, got {type(data_config).__name__}"
            )
        if data_config.get("crop_border_pixels"):
            raise UnsupportedError("timm's crop_border_pixels (TrimBorder) is not supported")
        image_size = _timm_image_size(data_config.get("input_size", 224))
        crop_pct = _timm_crop_pct(data_config.get("crop_pct") or _TIMM_DEFAULT_CROP_PCT)
        # Per dimension, exactly as timm's transforms_imagenet_eval computes it.
        scale = (math.floor(image_size[0] / crop_pct), math.floor(image_size[1] / crop_pct))
        mean = data_config.get("mean", _TIMM_DEFAULT_MEAN)
        try:
            mode, size, pad_value = _timm_resize(data_config.get("crop_mode"), scale, mean)
            return cls(
                resize_mode=mode,
                size=size,
                interpolation=_timm_interpolation(data_config.get("interpolation", "bilinear")),
                crop_size=image_size,
                rescale_factor=1 / 255,
                mean=mean,
                std=data_config.get("std", _TIMM_DEFAULT_STD),
                crop_convention="torchvision",
                pad_value=pad_value,
            )
        except InputError as error:
            raise SourceError(f"unusable timm data config: {error}") from error

    # --- running -------------------------------------------------------------------------

    @property
    def has_fixed_output_size(self) -> bool:
        """Whether every image gives the same tensor size (a crop, or an exact resize)."""
        return self.crop_size is not None or self.resize_mode == "exact"

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the tensors produced; UnsupportedError when it follows each image."""
        if self.crop_size is not None:
            return self.crop_size
        if self.resize_mode == "exact" and isinstance(self.size, tuple):
            return self.size
        raise UnsupportedError(
            f"this preprocessor (resize_mode '{self.resize_mode}', no crop) has no fixed output "
            "size: it follows each image's size; add a crop_size or use resize_mode 'exact'"
        )

    def __call__(self, images: Sequence[ImageInput] | ImageInput) -> np.ndarray:
        """Preprocess a batch into a C-contiguous float32 array of shape (N, 3, H, W).

        Items are PIL images (any mode), file paths or arrays, converted with ``load_image``;
        a single image, or a 4-D NHWC array, is taken as a batch.
        """
        batch = [self._pixels(image) for image in _as_batch(images)]
        if not batch:
            raise InputError("no images to preprocess; pass at least one image")
        shapes = {pixels.shape[:2] for pixels in batch}
        if len(shapes) > 1:
            raise InputError(
                f"images came out in different sizes {sorted(shapes)}; they cannot form one "
                "batch: preprocess them one at a time or set a crop_size"
            )
        height, width = batch[0].shape[:2]
        out = np.empty((len(batch), 3, height, width), dtype=np.float32)
        scale = np.float32(self.rescale_factor)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        for index, pixels in enumerate(batch):
            target = out[index]
            np.multiply(pixels.transpose(2, 0, 1), scale, out=target)
            target -= mean
            target /= std
        return out

    def _pixels(self, image: ImageInput) -> np.ndarray:
        """One image resized and cropped: uint8 (H, W, 3)."""
        rgb = image if isinstance(image, Image.Image) and image.mode == "RGB" else load_image(image)
        pixels = np.asarray(self._resize(rgb))
        if self.crop_size is not None:
            pixels = _center_crop(pixels, self.crop_size, self.crop_convention, self.pad_value)
        return pixels

    def _resize(self, image: Image.Image) -> Image.Image:
        height, width = image.height, image.width
        target = _resized_size(self.resize_mode, self.size, height, width)
        if target == (height, width):
            return image
        if min(target) < 1:
            raise InputError(
                f"image {width}×{height} is too thin to resize with resize_mode "
                f"'{self.resize_mode}' to {self.size}: a side would be 0 pixels"
            )
        return image.resize((target[1], target[0]), _PIL_RESAMPLE[self.interpolation])


# --- geometry ----------------------------------------------------------------------------


def _resized_size(
    mode: str, size: tuple[int, int] | int | None, height: int, width: int
) -> tuple[int, int]:
    """(height, width) after resizing, with each library's own rounding."""
    if mode == "exact" and isinstance(size, tuple):
        return size
    if mode == "shortest_edge" and isinstance(size, int):
        # torchvision's _compute_resized_output_size / transformers' get_resize_output_image_size.
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        return (new_long, size) if width <= height else (size, new_long)
    if mode in ("cover", "contain") and isinstance(size, tuple):
        # timm's ResizeKeepRatio.get_params with longest=0 (cover) or longest=1 (contain).
        ratio_h, ratio_w = height / size[0], width / size[1]
        ratio = max(ratio_h, ratio_w) if mode == "contain" else min(ratio_h, ratio_w)
        return round(height / ratio), round(width / ratio)
    return height, width


def _crop_offset(side: int, crop: int, convention: str) -> int:
    """Where the crop starts in the image along one axis; negative means padding before it."""
    if convention == "transformers":
        return (side - crop) // 2
    if crop > side:
        return -((crop - side) // 2)  # torchvision pads (crop - side) // 2 before.
    return round((side - crop) / 2.0)  # Python's round: half to even, as torchvision.


def _center_crop(
    pixels: np.ndarray, crop: tuple[int, int], convention: str, fill: tuple[int, int, int]
) -> np.ndarray:
    height, width = pixels.shape[:2]
    top = _crop_offset(height, crop[0], convention)
    left = _crop_offset(width, crop[1], convention)
    if top >= 0 and left >= 0 and top + crop[0] <= height and left + crop[1] <= width:
        return pixels[top : top + crop[0], left : left + crop[1]]
    out = np.empty((crop[0], crop[1], 3), dtype=np.uint8)
    out[...] = np.asarray(fill, dtype=np.uint8)
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(top + crop[0], height), min(left + crop[1], width)
    out[src_top - top : src_bottom - top, src_left - left : src_right - left] = pixels[
        src_top:src_bottom, src_left:src_right
    ]
    return out


def _as_batch(images: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    if isinstance(images, str | bytes | os.PathLike | Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


# --- validation (InputError; callers re-raise as their own kind) ---------------------------


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise InputError(f"'{name}' must be one of {', '.join(choices)}, got {value!r}{hint}")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    """Integers, numpy's included; bools are not sizes."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(name: str, value: object) -> int:
    if not _is_int(value) or int(value) < 1:
        raise InputError(f"'{name}' must be a positive integer, got {value!r}")
    return int(value)


def _hw(name: str, value: object) -> tuple[int, int]:
    """(height, width) from a pair or a single int meaning a square."""
    if _is_int(value):
        side = _positive_int(name, value)
        return side, side
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise InputError(f"'{name}' must be [height, width], got {value!r}")
    return _positive_int(name, value[0]), _positive_int(name, value[1])


def _check_size(mode: object, size: object) -> tuple[int, int] | int | None:
    if mode == "none":
        if size is not None:
            raise InputError(f"'size' must be null when resize_mode is 'none', got {size!r}")
        return None
    if mode == "shortest_edge":
        return _positive_int("size", size)
    return _hw("size", size)


def _finite_float(name: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise InputError(f"'{name}' must be a finite number, got {value!r}")
    return float(value)


def _positive_float(name: str, value: object) -> float:
    number = _finite_float(name, value)
    if number <= 0:
        raise InputError(f"'{name}' must be positive, got {value!r}")
    return number


def _byte(name: str, value: object) -> int:
    if not _is_int(value) or not 0 <= int(value) <= 255:
        raise InputError(f"'{name}' values must be integers in 0..255, got {value!r}")
    return int(value)


def _triple(name: str, value: object, check: Callable[[str, object], Any]) -> tuple[Any, Any, Any]:
    """Three per-channel (R, G, B) values."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise InputError(f"'{name}' must hold 3 values (R, G, B), got {value!r}")
    return check(name, value[0]), check(name, value[1]), check(name, value[2])


# --- transformers config parsing ---------------------------------------------------------


def _reject_hf_extras(config: Mapping[str, Any]) -> None:
    if config.get("crop_pct") is not None:
        raise UnsupportedError(
            "preprocessor_config.json sets 'crop_pct' (ConvNeXT-style resize then crop), "
            "which is not supported"
        )
    if config.get("do_pad"):
        raise UnsupportedError("preprocessor_config.json sets 'do_pad', which is not supported")


def _hf_processor_kind(config: Mapping[str, Any]) -> str:
    """The processor class name, without backend suffixes; legacy FeatureExtractor names mapped."""
    kind = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
    for suffix in ("Fast", "Pil"):
        kind = kind.removesuffix(suffix)
    if kind.endswith("FeatureExtractor"):
        kind = kind.removesuffix("FeatureExtractor") + "ImageProcessor"
    return kind


def _hf_with_defaults(
    config: Mapping[str, Any], kind: str, default_image_size: tuple[int, int] | None
) -> dict[str, Any]:
    """The config over its class's defaults; transformers treats null values as absent too."""
    given = {key: value for key, value in config.items() if value is not None}
    if "size" not in given and default_image_size is not None:
        given["size"] = {"height": default_image_size[0], "width": default_image_size[1]}
    return {**_HF_CLASS_DEFAULTS.get(kind, {}), **given}


def _hf_flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SourceError(f"preprocessor_config.json '{key}' must be true or false, got {value!r}")
    return value


def _hf_resize(config: Mapping[str, Any], kind: str) -> tuple[ResizeMode, Any]:
    """Resize mode and raw size value; the dataclass validates the value."""
    if not _hf_flag(config, "do_resize", True):
        return "none", None
    size = config.get("size")
    if size is None:
        return "exact", _HF_DEFAULT_SIZE
    if isinstance(size, int) and kind in _HF_INT_SIZE_IS_SHORTEST_EDGE:
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
    if _is_int(size) or isinstance(size, Sequence):
        return "exact", size
    raise SourceError(f"preprocessor_config.json 'size' is malformed: {size!r}")


def _hf_crop(config: Mapping[str, Any]) -> Any:
    if not _hf_flag(config, "do_center_crop", False):
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


def _hf_interpolation(resample: object) -> Interpolation:
    if _is_int(resample) and int(resample) in _RESAMPLE_FROM_CODE:
        return _RESAMPLE_FROM_CODE[int(resample)]
    if isinstance(resample, str) and resample.lower() in _PIL_RESAMPLE:
        return cast("Interpolation", resample.lower())
    raise SourceError(
        f"preprocessor_config.json 'resample' must be a PIL filter code 0-5, got {resample!r}"
    )


def _hf_rescale_factor(config: Mapping[str, Any]) -> Any:
    value = config.get("rescale_factor")
    return 1 / 255 if value is None else value


def _hf_stats(config: Mapping[str, Any], key: str) -> Any:
    value = config.get(key, _HF_DEFAULT_MEAN_STD)
    if value is None:
        return _HF_DEFAULT_MEAN_STD
    return (value,) * 3 if isinstance(value, numbers.Real) else value


# --- timm config parsing -----------------------------------------------------------------


def _timm_crop_pct(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise SourceError(f"timm data config 'crop_pct' must be a positive number, got {value!r}")
    return float(value)


def _timm_image_size(input_size: object) -> tuple[int, int]:
    if _is_int(input_size):
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
        return _hw("input_size", list(input_size[-2:]))
    except InputError as error:
        raise SourceError(f"timm data config {error}") from error


def _timm_interpolation(name: object) -> Interpolation:
    if not isinstance(name, str) or name not in _PIL_RESAMPLE:
        raise SourceError(
            f"timm data config 'interpolation' must be one of {', '.join(_PIL_RESAMPLE)}, "
            f"got {name!r}"
        )
    return cast("Interpolation", name)


def _timm_resize(
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
        channels = _triple("mean", mean, _finite_float)
        fill = (round(255 * channels[0]), round(255 * channels[1]), round(255 * channels[2]))
        return "contain", scale, fill
    raise UnsupportedError(
        f"timm crop_mode {crop_mode!r} is not supported; supported: center, squash, border"
    )
