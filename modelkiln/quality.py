"""The end-to-end quality gate: the artifact's pipeline against the torch fp32 pipeline on
real data, after every component passed its own validation.

Image models run the profile's `validation.data` images (labelled: top-1 accuracy and its
drop); diffusion models generate from `validation.prompts` with fixed seeds (PSNR / SSIM of
every image). The reference runs before anything is exported, so the two never hold their
weights at the same time; a miss fails the build, naming the measured value and the bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln.datasets import ImageSet, image_set
from modelkiln.errors import ProfileError, ValidationError
from modelkiln.image_quality import psnr, ssim
from modelkiln.progress import Progress
from modelkiln.reference import generate, reference_pipeline
from modelkiln.validate import OutputMetrics, Tolerance

if TYPE_CHECKING:
    from modelkiln.models.base import LoadedModel
    from modelkiln.profiles import Profile

BATCH = 16


@dataclass
class Reference:
    """What the torch fp32 pipeline produced on the profile's real data."""

    outputs: list[dict[str, np.ndarray]] | None = None  # image models, per batch
    images: ImageSet | None = None
    labels: np.ndarray | None = None  # label indices, when the images are labelled
    generated: list[Any] | None = None  # diffusion: PIL images


def wanted(profile: Profile) -> bool:
    return bool(profile.validation.data or profile.validation.prompts)


def reference(loaded: LoadedModel, profile: Profile, progress: Progress) -> Reference:
    settings = profile.validation
    with reference_pipeline(loaded, profile) as pipeline:
        if settings.prompts:
            generated = []
            description = f"reference images for {len(settings.prompts)} validation prompts"
            with progress.task(description, total=len(settings.prompts)) as advance:
                for index, prompt in enumerate(settings.prompts):
                    generated.append(
                        generate(pipeline, prompt, seed=settings.seed + index, steps=settings.steps)
                    )
                    advance(1)
            return Reference(generated=generated)
        assert settings.data is not None
        images = image_set(settings.data, "validation.data", "test")
        labels = None
        if loaded.task != "image-classification":
            if settings.max_accuracy_drop is not None:
                raise ProfileError(
                    f"validation.max_accuracy_drop applies to image classification, not to "
                    f"{loaded.task}; gate embeddings with validation.min_cosine"
                )
        elif images.class_names is not None or settings.max_accuracy_drop is not None:
            labels = images.label_indices(loaded.model_info["labels"], "validation.data")
        with progress.task(f"torch fp32 on {len(images)} validation images"):
            outputs = list(
                pipeline.batches(images.images, list(pipeline.session.output_specs), BATCH)
            )
        return Reference(outputs=outputs, images=images, labels=labels)


def check(
    artifact: Path, expected: Reference, profile: Profile, progress: Progress
) -> dict[str, Any]:
    """Run the built artifact on the same data; the manifest's record, or ValidationError."""
    from modelkiln.loading import load

    if expected.generated is not None:
        return _check_images(artifact, expected.generated, profile, progress)
    assert expected.outputs is not None and expected.images is not None
    with (
        load(artifact) as pipeline,
        progress.task(f"artifact on {len(expected.images)} validation images"),
    ):
        names = list(pipeline.session.output_specs)
        actual = list(pipeline.batches(expected.images.images, names, BATCH))
    metrics = {name: OutputMetrics() for name in names}
    specs = pipeline.session.output_specs
    for ours, theirs in zip(actual, expected.outputs, strict=True):
        for name in names:
            metrics[name].add(theirs[name], ours[name], specs[name].is_logits)
    settings = profile.validation
    # Real images: gate direction, noise and the predicted class; max-abs is gated per
    # component on random inputs already.
    tolerance = Tolerance(
        math.inf, settings.min_cosine, settings.min_top1_agreement, settings.min_sqnr_db
    )
    record: dict[str, Any] = {
        "data": settings.data,
        "images": len(expected.images),
        "outputs": {name: output.summary() for name, output in metrics.items()},
    }
    problems = [f"output '{n}': {p}" for n, m in metrics.items() for p in m.misses(tolerance)]
    if expected.labels is not None:
        reference_accuracy = _accuracy(expected.outputs, expected.labels)
        accuracy = _accuracy(actual, expected.labels)
        drop = 100 * (reference_accuracy - accuracy)
        record.update(reference_accuracy=reference_accuracy, accuracy=accuracy, accuracy_drop=drop)
        bound = settings.max_accuracy_drop
        if bound is not None and drop > bound:
            problems.append(
                f"top-1 accuracy {100 * accuracy:.2f}% is {drop:.2f} points below torch fp32's "
                f"{100 * reference_accuracy:.2f}% (validation.max_accuracy_drop = {bound})"
            )
    _fail_on(problems, f"on {len(expected.images)} images of {settings.data}")
    return record


def _accuracy(outputs: list[dict[str, np.ndarray]], labels: np.ndarray) -> float:
    predictions = np.concatenate([batch["logits"].argmax(-1) for batch in outputs])
    return float((predictions == labels).mean())


def _check_images(
    artifact: Path, expected: list[Any], profile: Profile, progress: Progress
) -> dict[str, Any]:
    from modelkiln.loading import load

    settings = profile.validation
    scores = []
    with (
        load(artifact) as pipeline,
        progress.task(
            f"artifact images for {len(settings.prompts)} validation prompts", total=len(expected)
        ) as advance,
    ):
        for index, (prompt, theirs) in enumerate(zip(settings.prompts, expected, strict=True)):
            ours = generate(pipeline, prompt, seed=settings.seed + index, steps=settings.steps)
            scores.append((psnr(ours, theirs), ssim(ours, theirs)))
            advance(1)
    worst_psnr = min(score[0] for score in scores)
    worst_ssim = min(score[1] for score in scores)
    record = {
        "prompts": list(settings.prompts),
        "steps": settings.steps,
        # JSON has no infinity: null means identical images.
        "psnr_db": [None if math.isinf(p) else round(p, 2) for p, _ in scores],
        "ssim": [round(s, 4) for _, s in scores],
    }
    problems = []
    if settings.min_psnr_db is not None and worst_psnr < settings.min_psnr_db:
        problems.append(
            f"PSNR {worst_psnr:.1f} dB < validation.min_psnr_db = {settings.min_psnr_db}"
        )
    if settings.min_ssim is not None and worst_ssim < settings.min_ssim:
        problems.append(f"SSIM {worst_ssim:.4f} < validation.min_ssim = {settings.min_ssim}")
    _fail_on(problems, f"on {len(scores)} images against the torch fp32 pipeline")
    return record


def _fail_on(problems: list[str], where: str) -> None:
    if problems:
        raise ValidationError(
            f"end-to-end quality {where} missed the profile's bounds: {'; '.join(problems)}. "
            "Pick a milder scheme (or keep a component in fp32 with [components.<name>] "
            'scheme = "none"), or loosen [validation] if this is expected'
        )


__all__ = ["Reference", "check", "reference", "wanted"]
