"""Real images for calibration and end-to-end validation: a folder, or the digits set.

A folder in ImageFolder layout (`<root>/<class name>/<image>`) is labelled by its
sub-folder names; a flat folder of images is unlabelled. `"digits"` is scikit-learn's bundled
digits set: its training split calibrates, its held-out split validates, so that a model is
never judged on the images it was calibrated with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from modelkiln.errors import ProfileError
from modelkiln.images import ImageInput

DIGITS = "digits"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class ImageSet:
    images: list[ImageInput]
    class_names: list[str] | None  # per image; None for an unlabelled folder

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, size: int, seed: int) -> ImageSet:
        """`size` images drawn without replacement (ImageFolder lists classes in order)."""
        if size >= len(self.images):
            return self
        chosen = sorted(np.random.default_rng(seed).choice(len(self.images), size, replace=False))
        names = self.class_names
        return ImageSet(
            [self.images[i] for i in chosen], [names[i] for i in chosen] if names else None
        )

    def label_indices(self, labels: Sequence[str], key: str) -> np.ndarray:
        """Each image's class as an index into the model's labels: by name, else by number."""
        if self.class_names is None:
            raise ProfileError(
                f"{key} is a flat folder of images, without labels: accuracy needs the "
                "ImageFolder layout (<root>/<class name>/<image>)"
            )
        positions = {name: index for index, name in enumerate(labels)}
        indices = []
        for name in self.class_names:
            if name in positions:
                indices.append(positions[name])
            elif name.isdigit() and int(name) < len(labels):
                indices.append(int(name))
            else:
                shown = ", ".join(labels[:5]) + (", ..." if len(labels) > 5 else "")
                raise ProfileError(
                    f"{key}: class folder '{name}' is neither one of the model's labels "
                    f"({shown}) nor a label index below {len(labels)}"
                )
        return np.asarray(indices, dtype=np.int64)


def image_set(spec: str, key: str, split: Literal["train", "test"]) -> ImageSet:
    """The images `spec` names: "digits" (that split) or a folder. `key` names the setting."""
    if spec == DIGITS:
        from modelkiln import digits

        data = digits.load_split()
        images, labels = (
            (data.train_images, data.train_labels)
            if split == "train"
            else (data.test_images, data.test_labels)
        )
        return ImageSet(list(digits.to_pil(images)), [str(int(label)) for label in labels])
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise ProfileError(
            f"{key} = '{spec}' is not a directory; give a folder of images (ImageFolder "
            f'layout for labels) or "{DIGITS}"'
        )
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ProfileError(
            f"{key} = '{spec}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    nested = [p.relative_to(root).parts for p in files]
    if all(len(parts) == 2 for parts in nested):
        return ImageSet(list(files), [parts[0] for parts in nested])
    if all(len(parts) == 1 for parts in nested):
        return ImageSet(list(files), None)
    raise ProfileError(
        f"{key} = '{spec}' mixes images at several depths; use either a flat folder or "
        "<root>/<class name>/<image>"
    )


__all__ = ["DIGITS", "ImageSet", "image_set"]
