"""Image embeddings on any backend: CLS, mean or pooled vectors, optionally of an inner block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Self

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

Pooling = Literal["auto", "cls", "mean", "pooled"]
POOLINGS = ("auto", "cls", "mean", "pooled")


class ImageEmbeddingPipeline(ImagePipeline):
    TASK = "image-feature-extraction"

    def __init__(
        self,
        session: Session,
        preprocessor: ImagePreprocessor,
        num_prefix_tokens: int,
        num_layers: int | None = None,
    ) -> None:
        super().__init__(session, preprocessor, self.TASK)
        self.num_prefix_tokens = num_prefix_tokens
        self.num_layers = num_layers

    @classmethod
    def from_parts(cls, parts: PipelineParts) -> Self:
        layers = parts.info.get("num_layers")
        return cls(
            one_session(parts),
            preprocessor_of(parts),
            int(parts.info["num_prefix_tokens"]),
            int(layers) if layers is not None else None,
        )

    @property
    def layers(self) -> list[int]:
        """Blocks whose hidden states this artifact exports (model.hidden_layers)."""
        prefix = "hidden_state_"
        return [int(n[len(prefix) :]) for n in self.session.output_specs if n.startswith(prefix)]

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        pooling: Pooling = "auto",
        layer: int | None = None,
        normalize: bool = True,
        batch_size: int = 8,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> np.ndarray:
        """(number of images, hidden size) float32; L2-normalised unless normalize=False.

        pooling: "cls" (first token), "mean" (patch tokens), "pooled" (the model's own pooler /
        timm's pre-logits / CLIP's projected image_embeds) or "auto" (pooled when the model has
        it and no layer is asked).
        layer: take the tokens of transformer block `layer` instead of the final ones.
        """
        output, mode = self._plan(pooling, layer)
        image_list, _ = as_image_list(images)
        parts = []
        for out in self.batches(image_list, [output], batch_size, max_pixels):
            parts.append(self._pool(out[output], mode))
        vectors = np.concatenate(parts).astype(np.float32)
        return normalised(vectors) if normalize else vectors

    def _plan(self, pooling: str, layer: int | None) -> tuple[str, str]:
        """Which output to fetch, and the concrete pooling for it."""
        if pooling not in POOLINGS:
            raise InputError(f"pooling '{pooling}' is unknown; use one of: {', '.join(POOLINGS)}")
        has_pooler = "pooler_output" in self.session.output_specs
        if layer is not None:
            if pooling == "pooled":
                raise InputError(
                    "pooling 'pooled' is the final pooler; with a layer use cls or mean"
                )
            if layer not in self.layers:
                exported = ", ".join(map(str, self.layers)) or "none"
                blocks = self.num_layers
                # Suggest a rebuild only for a layer the model has: the profile refuses others.
                if layer >= 1 and (blocks is None or layer <= blocks):
                    fix = f"rebuild with --set 'model.hidden_layers=[{layer}]'"
                else:
                    fix = f"layers are block numbers 1..{blocks or 'N'}"

                raise InputError(
                    f"this artifact exports no hidden state for layer {layer} (exported: "
                    f"{exported}); {fix}"
                )
            return f"hidden_state_{layer}", "cls" if pooling == "auto" else pooling
        if "image_embeds" in self.session.output_specs and pooling in ("auto", "pooled"):
            return "image_embeds", "pooled"  # CLIP's projected embedding: what retrieval uses
        if pooling == "pooled" and not has_pooler:
            raise InputError("this model has no pooler output; use pooling 'cls' or 'mean'")
        if pooling == "auto":
            pooling = "pooled" if has_pooler else "cls"
        return ("pooler_output" if pooling == "pooled" else "last_hidden_state"), pooling

    def _pool(self, values: np.ndarray, pooling: str) -> np.ndarray:
        if pooling == "pooled":
            return values
        if pooling == "cls":
            return values[:, 0]
        return values[:, self.num_prefix_tokens :].mean(axis=1)


def normalised(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (a zero row stays zero), float32."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)
