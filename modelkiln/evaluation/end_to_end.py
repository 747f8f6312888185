"""A pipeline end to end on real data, against the torch fp32 pipeline on the same data.

One scoring for the build's quality gate (modelkiln/quality.py) and `kiln bench`'s accuracy:
a pipeline's `evaluate(data)` returns what it produced, and `score` compares two such results
by what they are, not by which family made them:
- tensors (an image model's outputs over a set of images): every output's metrics against the
  reference's (cosine, SQNR, top-1 agreement), and top-1 / top-5 accuracy where the images are
  labelled and the model has labels;
- images (a generator's pictures from prompts with fixed seeds): PSNR and SSIM of each.
Results are saved to a folder and read back, so that an isolated benchmark process scores
against a reference computed once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from modelkiln.datasets import ImageSet
from modelkiln.errors import ArtifactError
from modelkiln.evaluation.metrics import OutputMetrics
from modelkiln.image_quality import psnr, ssim

if TYPE_CHECKING:
    from PIL import Image

TENSORS = "outputs.npz"
TENSOR_FACTS = "outputs.json"
IMAGE_FILE = "image-{index}.png"


@dataclass(frozen=True)
class ImageData:
    """Real images: `source` is what the profile or command line named ("digits", a folder)."""

    images: ImageSet
    source: str


@dataclass(frozen=True)
class PromptData:
    """Prompts, each generated with seed + its index, in `steps` denoising steps."""

    prompts: tuple[str, ...]
    seed: int
    steps: int


RealData = ImageData | PromptData


@dataclass
class TensorOutputs:
    """An image model's outputs over every image, stacked along the batch."""

    arrays: dict[str, np.ndarray]
    logits: frozenset[str] = frozenset()  # outputs that are class scores
    labels: list[str] | None = None  # the model's class names, when it has them


@dataclass
class GeneratedImages:
    images: list[Image.Image]


Outputs = TensorOutputs | GeneratedImages


@dataclass(frozen=True)
class Accuracy:
    """Top-1 / top-5 against the images' labels, as fractions."""

    top1: float
    top5: float
    reference_top1: float

    @property
    def drop_points(self) -> float:
        return 100 * (self.reference_top1 - self.top1)


@dataclass
class Scores:
    count: int  # images compared
    outputs: dict[str, OutputMetrics] = field(default_factory=dict)
    accuracy: Accuracy | None = None
    psnr_db: list[float] = field(default_factory=list)  # inf: identical images
    ssim: list[float] = field(default_factory=list)

    @property
    def main(self) -> OutputMetrics | None:
        """The first output's metrics (logits, or the last hidden state)."""
        return next(iter(self.outputs.values()), None)

    def psnr_json(self) -> list[float | None]:
        """JSON has no infinity: None means identical images."""
        return [None if math.isinf(p) else round(p, 2) for p in self.psnr_db]


def score(expected: Outputs, actual: Outputs, data: RealData) -> Scores:
    """The artifact's outputs (`actual`) against the reference's on the same data."""
    if isinstance(expected, GeneratedImages) and isinstance(actual, GeneratedImages):
        pairs = list(zip(actual.images, expected.images, strict=True))
        return Scores(
            count=len(pairs),
            psnr_db=[psnr(ours, theirs) for ours, theirs in pairs],
            ssim=[ssim(ours, theirs) for ours, theirs in pairs],
        )
    if isinstance(expected, TensorOutputs) and isinstance(actual, TensorOutputs):
        outputs = {}
        for name, values in actual.arrays.items():
            metrics = OutputMetrics()
            metrics.add(expected.arrays[name], values, name in actual.logits)
            outputs[name] = metrics
        count = len(next(iter(actual.arrays.values())))
        return Scores(count, outputs, _accuracy(expected, actual, data))
    raise TypeError("the reference and the artifact produced different kinds of output")


def _accuracy(expected: TensorOutputs, actual: TensorOutputs, data: RealData) -> Accuracy | None:
    if not isinstance(data, ImageData) or data.images.class_names is None:
        return None
    if actual.labels is None or not actual.logits:
        return None
    labels = data.images.label_indices(actual.labels, data.source)
    name = sorted(actual.logits)[0]
    ours, theirs = actual.arrays[name], expected.arrays[name]
    top5 = np.argsort(-ours, axis=-1)[:, : min(5, ours.shape[-1])]
    return Accuracy(
        top1=float((top5[:, 0] == labels).mean()),
        top5=float((top5 == labels[:, None]).any(-1).mean()),
        reference_top1=float((theirs.argmax(-1) == labels).mean()),
    )


def save_outputs(outputs: Outputs, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(outputs, GeneratedImages):
        for index, image in enumerate(outputs.images):
            image.save(folder / IMAGE_FILE.format(index=index))
        return
    np.savez(folder / TENSORS, **outputs.arrays)  # type: ignore[arg-type]
    facts = {"logits": sorted(outputs.logits), "labels": outputs.labels}
    (folder / TENSOR_FACTS).write_text(json.dumps(facts), encoding="utf-8")


def load_outputs(folder: Path, count: int | None = None) -> Outputs:
    """What save_outputs wrote; `count` images for generated ones."""
    if (folder / TENSORS).is_file():
        with np.load(folder / TENSORS) as stored:
            arrays = {name: stored[name] for name in stored.files}
        facts = json.loads((folder / TENSOR_FACTS).read_text(encoding="utf-8"))
        return TensorOutputs(arrays, frozenset(facts["logits"]), facts["labels"])
    from PIL import Image

    images = []
    for index in range(count or 0):
        path = folder / IMAGE_FILE.format(index=index)
        if not path.is_file():
            raise ArtifactError(f"the reference in {folder} has no {path.name}")
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return GeneratedImages(images)


def stack(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-batch outputs as one array per output."""
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


__all__ = [
    "Accuracy",
    "GeneratedImages",
    "ImageData",
    "Outputs",
    "PromptData",
    "RealData",
    "Scores",
    "TensorOutputs",
    "load_outputs",
    "save_outputs",
    "score",
    "stack",
]
