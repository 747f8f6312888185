"""Pixels in and out of the VAE, as diffusers' VaeImageProcessor prepares them: images
resized with Lanczos and scaled to [-1, 1], masks binarised at 0.5, decoded samples back to
8-bit RGB."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


def resized(image: Image.Image, height: int, width: int) -> Image.Image:
    from PIL import Image

    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def image_to_pixels(image: Image.Image, height: int, width: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [-1, 1] from an RGB image."""
    array = np.asarray(resized(image.convert("RGB"), height, width), dtype=np.float32) / 255.0
    return (array.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def mask_to_pixels(mask: Image.Image, height: int, width: int) -> np.ndarray:
    """(1, 1, height, width) float32 of 0 (keep) and 1 (repaint): grey first, then resized,
    then binarised at 0.5, in diffusers' order."""
    array = np.asarray(resized(mask.convert("L"), height, width), dtype=np.float32) / 255.0
    return (array >= 0.5).astype(np.float32)[None, None]


def pixels_to_images(samples: np.ndarray) -> list[Image.Image]:
    """RGB images from the VAE decoder's (N, 3, H, W) output in [-1, 1]."""
    from PIL import Image

    scaled = np.clip(samples / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    return [Image.fromarray(image) for image in (scaled * 255).round().astype(np.uint8)]


__all__ = ["image_to_pixels", "mask_to_pixels", "pixels_to_images"]
