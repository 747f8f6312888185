"""Zero-shot image classification with CLIP on any backend: images and free-text labels in,
the labels ranked by CLIP's softmax over logit_scale * cosine(image, label) out, as
transformers' CLIPModel computes logits_per_image. No torch: the labels are tokenized with
the torch-free CLIP tokenizer of the diffusion runtime."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Self

import numpy as np

from modelkiln.diffusion.tokenizer import ClipTokenizer
from modelkiln.errors import InputError, UnsupportedError
from modelkiln.images import DEFAULT_MAX_PIXELS, ImageInput
from modelkiln.pipelines.base import (
    Feeds,
    ImagePipeline,
    PipelineParts,
    as_image_list,
    preprocessor_of,
    run_padded,
)
from modelkiln.pipelines.classification import Prediction, softmax
from modelkiln.pipelines.embedding import normalised
from modelkiln.preprocess import ImagePreprocessor
from modelkiln.runtimes import Session

VISION, TEXT = "vision_model", "text_model"
TOKENIZER_FOLDER = "tokenizer"
MAX_LABELS = 10_000


class ZeroShotImageClassificationPipeline(ImagePipeline):
    TASK = "zero-shot-image-classification"
    stages: ClassVar[Mapping[str, str]] = {VISION: "image encoder", TEXT: "text encoder"}

    def __init__(
        self,
        vision: Session,
        text: Session,
        preprocessor: ImagePreprocessor,
        tokenizer: ClipTokenizer,
        logit_scale: float,
    ) -> None:
        super().__init__(vision, preprocessor, self.TASK)
        self.sessions[text.name] = text
        self.text = text
        self.tokenizer = tokenizer
        self.logit_scale = logit_scale

    @classmethod
    def from_parts(cls, parts: PipelineParts) -> Self:
        tokenizer = ClipTokenizer.from_folder(parts.root / TOKENIZER_FOLDER)
        return cls(
            parts.sessions[VISION],
            parts.sessions[TEXT],
            preprocessor_of(parts),
            tokenizer,
            float(parts.info["logit_scale"]),
        )

    def image_embeddings(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 8,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> np.ndarray:
        """(number of images, projection) float32, L2-normalised: CLIP's image_embeds."""
        return normalised(self.concatenated(images, "image_embeds", batch_size, max_pixels))

    def text_embeddings(self, labels: Sequence[str]) -> np.ndarray:
        """(number of labels, projection) float32, L2-normalised: CLIP's text_embeds."""
        labels = _checked(labels)
        ids = self.tokenizer(labels)
        return normalised(run_padded(self.text, {"input_ids": ids})["text_embeds"])

    def logits(
        self,
        images: ImageInput | Sequence[ImageInput],
        labels: Sequence[str],
        *,
        batch_size: int = 8,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> np.ndarray:
        """logits_per_image: (number of images, number of labels)."""
        texts = self.text_embeddings(labels)
        pictures = self.image_embeddings(images, batch_size=batch_size, max_pixels=max_pixels)
        return (self.logit_scale * pictures @ texts.T).astype(np.float32)

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        labels: Sequence[str],
        top_k: int = 5,
        batch_size: int = 8,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> Any:
        """The labels ranked per image (softmax over them): a list for one image, a list of
        lists for a list of images."""
        if top_k < 1:
            raise InputError(f"top_k must be >= 1, got {top_k}")
        labels = _checked(labels)
        image_list, single = as_image_list(images)
        probabilities = softmax(
            self.logits(image_list, labels, batch_size=batch_size, max_pixels=max_pixels)
        )
        k = min(top_k, len(labels))
        results = []
        for row in probabilities:
            best = np.argsort(-row, kind="stable")[:k]
            results.append([Prediction(labels[i], float(row[i]), int(i)) for i in best])
        return results[0] if single else results

    @classmethod
    def calibration_feeds(
        cls, loaded: Any, profile: Any, components: list[str], progress: Any
    ) -> dict[str, Feeds]:
        if TEXT in components:
            raise UnsupportedError(
                "calibrated int8 applies to a zero-shot CLIP's vision_model only (the text "
                "tower would need label prompts): set [components.text_model] scheme to "
                "'none' or a weight-only scheme"
            )
        return super().calibration_feeds(_vision_only(loaded), profile, components, progress)

    def bench_call(self, batch_size: int, steps: int) -> Callable[[], object]:
        """batch_size images scored against ten labels, both towers run each call."""
        score_images = super().bench_call(batch_size, steps)
        ids = self.tokenizer([f"a photo of a number {n}" for n in range(10)])

        def call() -> object:
            score_images()
            return run_padded(self.text, {"input_ids": ids})

        return call


def _checked(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str):
        raise InputError('labels must be a list of strings; split "a,b" into ["a", "b"]')
    labels = [str(label).strip() for label in labels]
    if not labels or any(not label for label in labels):
        raise InputError("zero-shot classification needs at least one non-empty label")
    if len(labels) > MAX_LABELS:
        raise InputError(f"at most {MAX_LABELS} labels per call, got {len(labels)}")
    return labels


def _vision_only(loaded: Any) -> Any:
    from dataclasses import replace

    return replace(loaded, components=[c for c in loaded.components if c.name == VISION])
