"""A real accuracy yardstick without downloads: a small ViT trained on scikit-learn's digits.

The 8×8 digits are stored as 8-bit grayscale PNGs and read through the artifact's own image
preprocessing (resize to 32×32, normalise), so training, the torch reference and every
exported backend see exactly the same pixels. The trained model is cached by a key of its
recipe, so the demo and the tests train it once per machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from modelkiln.errors import missing_backend
from modelkiln.outputs import atomic_directory
from modelkiln.preprocess import ImagePreprocessor
from modelkiln.progress import NullProgress, Progress

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
TRAINING_RECORD = "digits_training.json"


@dataclass(frozen=True)
class DigitsRecipe:
    """Everything that determines the trained weights; its hash names the cache entry."""

    image_size: int = IMAGE_SIZE
    patch_size: int = 4
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    revision: int = 1  # bump when the training code changes meaning

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DigitsSplit:
    train_images: np.ndarray  # (N, 8, 8) uint8, 0..255
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_split(recipe: DigitsRecipe = DigitsRecipe()) -> DigitsSplit:
    """scikit-learn's bundled digits (1,797 images), stratified into train and held-out test."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise missing_backend("scikit-learn", "demo") from error
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    train_x, test_x, train_y, test_y = train_test_split(
        images,
        digits.target,
        test_size=recipe.test_fraction,
        random_state=recipe.seed,
        stratify=digits.target,
    )
    return DigitsSplit(train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64))


def preprocessor_config(recipe: DigitsRecipe = DigitsRecipe()) -> dict[str, Any]:
    """The model's preprocessor_config.json (transformers ViTImageProcessor)."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": recipe.image_size, "width": recipe.image_size},
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(image, mode="L") for image in images]


def write_image_folder(directory: Path, images: np.ndarray, labels: np.ndarray) -> list[Path]:
    """PNG files in ImageFolder layout (directory/<label>/<index>.png), in input order."""
    paths = []
    for index, (image, label) in enumerate(zip(to_pil(images), labels, strict=True)):
        path = directory / str(int(label)) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        paths.append(path)
    return paths


def cache_root() -> Path:
    from modelkiln.env import cache_home

    return cache_home()


def trained_model(
    recipe: DigitsRecipe = DigitsRecipe(),
    *,
    cache: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """The trained digits ViT as a transformers model directory, training it if not cached."""
    directory = (cache or cache_root()) / f"digits-vit-{recipe.key()}"
    if (directory / TRAINING_RECORD).is_file():
        return directory
    with atomic_directory(directory, marker=TRAINING_RECORD) as staging:
        train(recipe, staging, progress=progress or NullProgress())
    return directory


def training_record(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / TRAINING_RECORD).read_text(encoding="utf-8"))


def train(recipe: DigitsRecipe, out_dir: Path, *, progress: Progress) -> float:
    """Train with light affine augmentation; save the model and return held-out accuracy."""
    import torch
    import torch.nn.functional as F
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(recipe.seed)
    split = load_split(recipe)
    preprocess = ImagePreprocessor.from_hf_config(preprocessor_config(recipe))
    train_x = torch.from_numpy(preprocess(to_pil(split.train_images)))
    test_x = torch.from_numpy(preprocess(to_pil(split.test_images)))
    train_y, test_y = torch.from_numpy(split.train_labels), torch.from_numpy(split.test_labels)
    labels = [str(i) for i in range(10)]
    settings: dict[str, Any] = dict(
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        intermediate_size=recipe.intermediate_size,
        num_labels=10,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    config = ViTConfig(**settings)
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    steps_per_epoch = -(-len(train_x) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=recipe.learning_rate,
        total_steps=recipe.epochs * steps_per_epoch,
        pct_start=0.1,
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    with progress.task("training the digits ViT", total=recipe.epochs) as advance:
        for _ in range(recipe.epochs):
            model.train()
            for batch_x, batch_y in _batches(train_x, train_y, recipe.batch_size, generator):
                augmented = _augment(batch_x, generator)
                logits = model(pixel_values=augmented).logits
                loss = F.cross_entropy(logits, batch_y, label_smoothing=recipe.label_smoothing)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
            advance(1)
    model.eval()
    with torch.inference_mode():
        accuracy = float((model(pixel_values=test_x).logits.argmax(-1) == test_y).float().mean())
    from modelkiln.quiet import quiet_libraries

    with quiet_libraries():
        model.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(recipe), indent=2) + "\n", encoding="utf-8"
    )
    record = {"recipe": asdict(recipe), "test_accuracy": accuracy, "test_images": len(test_x)}
    (out_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("digits ViT: held-out accuracy %.4f", accuracy)
    return accuracy


def _batches(x: Any, y: Any, size: int, generator: Any) -> Iterator[tuple[Any, Any]]:
    import torch

    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), size):
        index = order[start : start + size]
        yield x[index], y[index]


def _augment(batch: Any, generator: Any) -> Any:
    """Random rotation (±8.6°), scale (±10 %) and shift (±12.5 %), as handwriting varies."""
    import torch
    import torch.nn.functional as F

    n = len(batch)
    angle = (torch.rand(n, generator=generator) - 0.5) * 0.3
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.25
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(angle) * scale
    theta[:, 0, 1] = -torch.sin(angle) * scale
    theta[:, 1, 0] = torch.sin(angle) * scale
    theta[:, 1, 1] = torch.cos(angle) * scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    # Shift to [0, 2] so that the zero padding is the black (-1) background.
    return F.grid_sample(batch + 1, grid, align_corners=False) - 1
