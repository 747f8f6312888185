"""Image classification on any backend: images in, top-k labels with scores out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from modelkiln.errors import InputError
from modelkiln.images import DEFAULT_MAX_PIXELS, ImageInput
from modelkiln.pipelines.base import (
    ImagePipeline,
    PipelineParts,
    as_image_list,
    one_session,
    preprocessor_of,
)
from modelkiln.preprocess import ImagePreprocessor
from modelkiln.runtimes import Session


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float  # softmax probability
    index: int


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class ImageClassificationPipeline(ImagePipeline):
    TASK = "image-classification"

    def __init__(
        self, session: Session, preprocessor: ImagePreprocessor, labels: Sequence[str]
    ) -> None:
        super().__init__(session, preprocessor, self.TASK)
        self.labels = list(labels)

    @classmethod
    def from_parts(cls, parts: PipelineParts) -> Self:
        return cls(one_session(parts), preprocessor_of(parts), parts.info["labels"])

    def labels_for_evaluation(self) -> list[str] | None:
        return self.labels

    def logits(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 8,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> np.ndarray:
        """Raw logits, (number of images, number of labels)."""
        return self.concatenated(images, "logits", batch_size, max_pixels)

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = 5,
        batch_size: int = 8,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> Any:
        """Top-k predictions: a list for one image, a list of lists for a list of images."""
        if top_k < 1:
            raise InputError(f"top_k must be >= 1, got {top_k}")
        image_list, single = as_image_list(images)
        probabilities = softmax(
            self.logits(image_list, batch_size=batch_size, max_pixels=max_pixels)
        )
        k = min(top_k, probabilities.shape[1])
        results = []
        for row in probabilities:
            best = np.argsort(-row, kind="stable")[:k]
            results.append([Prediction(self.labels[i], float(row[i]), int(i)) for i in best])
        return results[0] if single else results
