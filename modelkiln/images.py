"""Robust image loading: every input becomes an 8-bit RGB ``PIL.Image.Image`` or an InputError.

Conversion follows what Hugging Face's ``load_image`` and timm's loaders do (``.convert("RGB")``:
alpha dropped, palettes expanded, grayscale replicated; EXIF orientation applied to files as
``transformers.image_utils.load_image`` does), except where Pillow's conversion loses the
image: 16-bit grayscale is scaled to 8 bits instead of clipped, and float images are scaled
from [0, 1].

Only numpy and Pillow are needed here; this module runs without torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeAlias

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from modelkiln.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterable

ImageInput: TypeAlias = str | os.PathLike[str] | Image.Image | np.ndarray

DEFAULT_MAX_PIXELS: int = 100_000_000

# Modes Pillow's convert("RGB") clips instead of scaling; they go through numpy instead.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_EXIF_ORIENTATION = 0x0112
_ARRAY_LAYOUTS = "HxW grayscale, or HxWxC with C = 1, 3 or 4 (channels last)"
_ARRAY_DTYPES = "uint8, uint16, bool, or float16/32/64 in [0, 1]"


def load_image(image: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load one image as a fully decoded, mode "RGB" ``PIL.Image.Image``.

    ``image`` is a file path, a ``PIL.Image.Image`` (never mutated; a new image is returned) or
    a numpy array (HxW or HxWxC, C in 1/3/4, see ``_ARRAY_DTYPES``). ``max_pixels`` bounds
    width×height of image files, checked from the header before decoding; None disables it.
    Raises InputError with a one-line message for anything unreadable or unsupported.
    """
    if max_pixels is not None and max_pixels < 1:
        raise InputError(f"max_pixels must be >= 1 (or None: no limit), got {max_pixels}")
    if isinstance(image, str | os.PathLike):
        return _load_file(image, max_pixels)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, _pil_name(image))
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise InputError(
        f"cannot load an image from a {type(image).__name__}; "
        "pass a file path, a PIL.Image.Image or a numpy array"
    )


def load_images(
    images: Iterable[ImageInput], *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> list[Image.Image]:
    """Load each image with ``load_image``; a 4-D numpy array is taken as an NHWC batch.

    Errors about in-memory inputs are prefixed with the item's index (files name themselves).
    """
    if isinstance(images, str | os.PathLike | Image.Image):
        raise InputError(
            f"load_images takes a list of images, got a single {type(images).__name__}; "
            "wrap it in a list or call load_image"
        )
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise InputError(
            f"load_images takes a list of images or a 4-D NHWC array, got an array of shape "
            f"{images.shape}; call load_image for a single image"
        )
    loaded = []
    for index, image in enumerate(images):
        try:
            loaded.append(load_image(image, max_pixels=max_pixels))
        except InputError as error:
            if isinstance(image, str | os.PathLike):
                raise
            raise InputError(f"images[{index}]: {error}") from error
    return loaded


# --- files -------------------------------------------------------------------------------


def _load_file(source: str | os.PathLike[str], max_pixels: int | None) -> Image.Image:
    path = Path(os.fsdecode(source))
    name = str(source)
    if not path.exists():
        raise InputError(f"no such image file: '{name}'; check the path")
    if path.is_dir():
        raise InputError(f"'{name}' is a directory, not an image file; pass the path of an image")
    try:
        # Our own file object so the handle is closed however decoding ends.
        with path.open("rb") as handle:
            image = _open_header(handle, name, max_pixels)
            _check_pixels(image.size, name, max_pixels)
            _decode(image, name)
            # Photos carry their orientation in EXIF; HF's load_image applies it, so do we.
            return _pil_to_rgb(_exif_transpose(image), name)
    except PermissionError as error:
        raise InputError(
            f"cannot read image file '{name}': permission denied; check its permissions"
        ) from error


def _open_header(handle: BinaryIO, name: str, max_pixels: int | None) -> Image.Image:
    """Image.open reads the header only; the pixel data is decoded later by _decode."""
    try:
        return Image.open(handle)
    except Image.DecompressionBombError as error:
        raise InputError(_bomb_message(name, error, max_pixels)) from error
    except UnidentifiedImageError as error:
        # Pillow's own message only repeats the file object; ours names the file.
        raise InputError(
            f"'{name}' is not an image file Pillow can read; "
            "pass a PNG, JPEG, WebP, BMP, TIFF or GIF file"
        ) from error
    except PermissionError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InputError(
            f"image file '{name}' is corrupt: its header cannot be read ({_first_line(error)}); "
            "re-export or re-download it"
        ) from error


def _decode(image: Image.Image, name: str) -> None:
    """Decode all pixel data now, so truncated files fail here and not at first use."""
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as error:  # Pillow's decoders raise OSError, SyntaxError, zlib.error, ...
        raise InputError(
            f"image file '{name}' is truncated or corrupt and cannot be decoded "
            f"({_first_line(error)}); re-export or re-download it"
        ) from error


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(
            f"image '{name}' is {width}×{height} ({_pixels_text(width * height)}), over the "
            f"limit of {_pixels_text(max_pixels)}; downscale it or raise max_pixels "
            "(kiln: --max-pixels)"
        )


def _pixels_text(pixels: int) -> str:
    """Megapixels where that reads well, an exact count for small limits."""
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels:,} pixels"


def _bomb_message(name: str, error: Exception, max_pixels: int | None) -> str:
    # Pillow refuses before we see the header; its message has the pixel count, not the sides.
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = int(found.group(1)) if found else None
    size = f"has {_pixels_text(pixels)}" if pixels is not None else "is too large"
    if pixels is not None and max_pixels is not None and pixels > max_pixels:
        return (
            f"image '{name}' {size}, over the limit of {_pixels_text(max_pixels)}; "
            "downscale it or raise max_pixels (kiln: --max-pixels)"
        )
    limit = _pixels_text(2 * (Image.MAX_IMAGE_PIXELS or 0))
    return (
        f"image '{name}' {size}, over Pillow's decompression-bomb limit of {limit}; "
        "downscale it or raise PIL.Image.MAX_IMAGE_PIXELS"
    )


def _exif_transpose(image: Image.Image) -> Image.Image:
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return image  # Upright already: skip exif_transpose's copy.
        return ImageOps.exif_transpose(image)
    except Exception:  # A malformed EXIF block must not make a decodable image unusable.
        return image


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# --- PIL images --------------------------------------------------------------------------


def _pil_name(image: Image.Image) -> str:
    filename = getattr(image, "filename", "")
    return str(filename) if filename else f"<{image.mode} image {image.width}×{image.height}>"


def _pil_to_rgb(image: Image.Image, name: str) -> Image.Image:
    """A new RGB image; the input is left untouched."""
    if image.width == 0 or image.height == 0:
        raise InputError(f"image '{name}' is empty ({image.width}×{image.height} pixels)")
    try:
        if image.mode in _SIXTEEN_BIT_MODES:
            return _gray_to_rgb(_sixteen_to_eight(np.asarray(image)))
        if image.mode == "I":
            return _gray_to_rgb(_int32_to_eight(np.asarray(image)))
        if image.mode == "F":
            return _gray_to_rgb(_float_image_to_eight(np.asarray(image)))
        # convert() returns a new image even for "RGB", so the caller's image is never aliased.
        return image.convert("RGB")
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # A lazily opened PIL image decodes here; so do bad modes.
        raise InputError(
            f"cannot convert image '{name}' (mode {image.mode}) to RGB ({_first_line(error)}); "
            "pass an RGB, RGBA, grayscale or palette image"
        ) from error


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    # Scale 0..65535 onto 0..255 (value/257, rounded) instead of Pillow's clip at 255.
    return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)


def _int32_to_eight(values: np.ndarray) -> np.ndarray:
    # Mode "I" holds 16-bit data from some decoders; only values above 255 reveal it.
    if values.size and int(values.max()) > 255:
        return _sixteen_to_eight(np.clip(values, 0, 65535))
    return np.clip(values, 0, 255).astype(np.uint8)


def _float_image_to_eight(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)))


# --- numpy arrays ------------------------------------------------------------------------


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    _check_layout(array)
    pixels = _array_to_uint8(array)
    if pixels.ndim == 3:
        pixels = pixels[:, :, 0] if pixels.shape[2] == 1 else pixels[:, :, :3]
    if pixels.ndim == 2:
        return _gray_to_rgb(pixels)
    return Image.fromarray(np.ascontiguousarray(pixels))


def _check_layout(array: np.ndarray) -> None:
    shape = array.shape
    if array.size == 0:
        raise InputError(f"image array of shape {shape} is empty; pass an array with pixels")
    if array.ndim == 3 and shape[2] in (1, 3, 4):
        return
    if array.ndim == 2:
        return
    hint = ""
    if array.ndim == 3 and shape[0] in (1, 3, 4):
        hint = " (it looks channels-first: use array.transpose(1, 2, 0))"
    elif array.ndim == 4:
        hint = " (a batch: pass its images one by one, or use load_images)"
    raise InputError(
        f"image array of shape {shape} is not an image layout{hint}; accepted: {_ARRAY_LAYOUTS}"
    )


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    kind, itemsize = array.dtype.kind, array.dtype.itemsize
    if kind == "u" and itemsize == 1:
        return array
    if kind == "u" and itemsize == 2:
        return _sixteen_to_eight(array)
    if kind == "b":
        return array.astype(np.uint8) * np.uint8(255)
    if kind == "f" and itemsize in (2, 4, 8):
        return _unit_float_to_eight(array)
    raise InputError(
        f"image array of dtype {array.dtype} is not supported; accepted: {_ARRAY_DTYPES}"
    )


def _unit_float_to_eight(array: np.ndarray) -> np.ndarray:
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise InputError(
            f"float image array ({array.dtype}) contains NaN or infinite values; "
            "pass finite values in [0, 1]"
        )
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise InputError(
            f"float image array ({array.dtype}) has values in [{low:g}, {high:g}], "
            "outside [0, 1]; divide by 255 or pass it as uint8"
        )
    return np.rint(values * 255.0).astype(np.uint8)
