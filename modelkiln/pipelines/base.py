"""What every image pipeline shares: chunked loading, preprocessing and fixed-batch padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import cast

import numpy as np

from modelkiln.errors import InputError
from modelkiln.images import DEFAULT_MAX_PIXELS, ImageInput, load_images
from modelkiln.preprocess import ImagePreprocessor
from modelkiln.runtimes import Session
from modelkiln.runtimes.base import Closeable

PIXEL_VALUES = "pixel_values"


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> tuple[list[ImageInput], bool]:
    """A list of images, and whether a single image (not a list) was given."""
    if isinstance(images, list | tuple):
        if not images:
            raise InputError("no images given")
        return list(images), False
    return [cast(ImageInput, images)], True


class ImagePipeline(Closeable):
    """Owns one vision Session and its preprocessing; subclasses interpret the outputs."""

    def __init__(self, session: Session, preprocessor: ImagePreprocessor) -> None:
        self.session = session
        self.preprocessor = preprocessor
        batch = session.input_specs[PIXEL_VALUES].shape[0]
        # A static-batch export accepts exactly that batch: short chunks are padded.
        self.fixed_batch = batch if isinstance(batch, int) else None

    def batches(
        self,
        images: list[ImageInput],
        outputs: list[str],
        batch_size: int,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Load, preprocess and run images chunk by chunk (memory stays bounded)."""
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        step = self.fixed_batch or batch_size
        for start in range(0, len(images), step):
            chunk = load_images(images[start : start + step], max_pixels=max_pixels)
            pixels = self.preprocessor(chunk)
            count = len(pixels)
            if self.fixed_batch and count < self.fixed_batch:
                padding = np.zeros((self.fixed_batch - count, *pixels.shape[1:]), pixels.dtype)
                pixels = np.concatenate([pixels, padding])
            results = self.session.run({PIXEL_VALUES: pixels}, outputs)
            yield {name: value[:count] for name, value in results.items()}

    def close(self) -> None:
        self.session.close()
