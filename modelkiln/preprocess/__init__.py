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
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

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
from modelkiln.preprocess.checks import (
    CROP_CONVENTIONS,
    INTERPOLATIONS,
    PIL_RESAMPLE,
    RESIZE_MODES,
    CropConvention,
    Interpolation,
    ResizeMode,
    byte,
    check_size,
    choice,
    finite_float,
    hw,
    positive_float,
    triple,
)
from modelkiln.preprocess.configs import (
    TIMM_DEFAULT_CROP_PCT,
    TIMM_DEFAULT_MEAN,
    TIMM_DEFAULT_STD,
    hf_crop,
    hf_flag,
    hf_interpolation,
    hf_processor_kind,
    hf_rescale_factor,
    hf_resize,
    hf_stats,
    hf_with_defaults,
    reject_hf_extras,
    timm_crop_pct,
    timm_image_size,
    timm_interpolation,
    timm_resize,
)

logger = logging.getLogger(__name__)


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
            "resize_mode": choice("resize_mode", self.resize_mode, RESIZE_MODES),
            "size": check_size(self.resize_mode, self.size),
            "interpolation": choice("interpolation", self.interpolation, INTERPOLATIONS),
            "crop_size": None if self.crop_size is None else hw("crop_size", self.crop_size),
            "rescale_factor": positive_float("rescale_factor", self.rescale_factor),
            "mean": triple("mean", self.mean, finite_float),
            "std": triple("std", self.std, positive_float),
            "crop_convention": choice("crop_convention", self.crop_convention, CROP_CONVENTIONS),
            "pad_value": triple("pad_value", self.pad_value, byte),
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
        kind = hf_processor_kind(config)
        config = hf_with_defaults(config, kind, default_image_size)
        reject_hf_extras(config)
        mode, size = hf_resize(config, kind)
        do_rescale = hf_flag(config, "do_rescale", True)
        do_normalize = hf_flag(config, "do_normalize", True)
        try:
            return cls(
                resize_mode=mode,
                size=size,
                interpolation=hf_interpolation(config.get("resample", 2)),
                crop_size=hf_crop(config),
                rescale_factor=hf_rescale_factor(config) if do_rescale else 1.0,
                mean=hf_stats(config, "image_mean") if do_normalize else (0.0, 0.0, 0.0),
                std=hf_stats(config, "image_std") if do_normalize else (1.0, 1.0, 1.0),
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
        config["resample"] = int(PIL_RESAMPLE[self.interpolation])
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
        image_size = timm_image_size(data_config.get("input_size", 224))
        crop_pct = timm_crop_pct(data_config.get("crop_pct") or TIMM_DEFAULT_CROP_PCT)
        # Per dimension, exactly as timm's transforms_imagenet_eval computes it.
        scale = (math.floor(image_size[0] / crop_pct), math.floor(image_size[1] / crop_pct))
        mean = data_config.get("mean", TIMM_DEFAULT_MEAN)
        try:
            mode, size, pad_value = timm_resize(data_config.get("crop_mode"), scale, mean)
            return cls(
                resize_mode=mode,
                size=size,
                interpolation=timm_interpolation(data_config.get("interpolation", "bilinear")),
                crop_size=image_size,
                rescale_factor=1 / 255,
                mean=mean,
                std=data_config.get("std", TIMM_DEFAULT_STD),
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
        return image.resize((target[1], target[0]), PIL_RESAMPLE[self.interpolation])


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
