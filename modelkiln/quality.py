"""The end-to-end quality gate: the artifact's pipeline against the torch fp32 pipeline on
real data, after every component passed its own validation.

The profile's [validation] `data` (images: every output's cosine / SQNR / top-1 agreement,
and top-1 accuracy and its drop where labelled) or `prompts` (generated images: PSNR / SSIM),
scored by modelkiln.evaluation like `kiln bench` scores them. The reference runs before
anything is exported, so the two never hold their weights at the same time; a miss fails the
build, naming the measured value and the bound.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from modelkiln.datasets import image_set
from modelkiln.errors import ProfileError, ValidationError
from modelkiln.evaluation.end_to_end import (
    ImageData,
    Outputs,
    PromptData,
    RealData,
    Scores,
    TensorOutputs,
    score,
)
from modelkiln.evaluation.metrics import Tolerance
from modelkiln.progress import Progress
from modelkiln.records import EndToEndRecord, OutputScore
from modelkiln.reference import reference_pipeline

if TYPE_CHECKING:
    from modelkiln.models.base import LoadedModel
    from modelkiln.profiles import Profile


def wanted(profile: Profile) -> bool:
    return bool(profile.validation.data or profile.validation.prompts)


def real_data(profile: Profile) -> RealData:
    """[validation]'s real data: its prompts, or the held-out split of its images."""
    settings = profile.validation
    if settings.prompts:
        return PromptData(settings.prompts, settings.seed, settings.steps)
    assert settings.data is not None  # wanted() said so
    return ImageData(image_set(settings.data, "validation.data", "test"), settings.data)


def reference(loaded: LoadedModel, profile: Profile, progress: Progress) -> Outputs:
    """The torch fp32 pipeline's results on the profile's real data."""
    data = real_data(profile)
    with reference_pipeline(loaded, profile) as pipeline:
        expected = pipeline.evaluate(data, progress)
    labelled = isinstance(expected, TensorOutputs) and expected.labels is not None
    if profile.validation.max_accuracy_drop is not None and not labelled:
        raise ProfileError(
            f"validation.max_accuracy_drop applies to image classification, not to "
            f"{loaded.task}; gate embeddings with validation.min_cosine"
        )
    if labelled and isinstance(data, ImageData):
        wants_labels = profile.validation.max_accuracy_drop is not None
        if wants_labels or data.images.class_names is not None:
            # Before the export: images that cannot be matched to the model's labels fail now.
            assert isinstance(expected, TensorOutputs) and expected.labels is not None
            data.images.label_indices(expected.labels, "validation.data")
    return expected


def check(
    artifact: Path, expected: Outputs, profile: Profile, progress: Progress
) -> EndToEndRecord:
    """Run the built artifact on the same data; the manifest's record, or ValidationError."""
    from modelkiln.loading import load

    data = real_data(profile)
    with load(artifact) as pipeline:
        actual = pipeline.evaluate(data, progress)
    scores = score(expected, actual, data)
    settings = profile.validation
    if isinstance(data, PromptData):
        problems = _image_problems(scores, profile)
        where = f"on {scores.count} images against the torch fp32 pipeline"
        record = EndToEndRecord(
            prompts=data.prompts,
            steps=data.steps,
            psnr_db=tuple(scores.psnr_json()),
            ssim=tuple(round(value, 4) for value in scores.ssim),
        )
    else:
        problems = _tensor_problems(scores, profile)
        where = f"on {scores.count} images of {settings.data}"
        accuracy = scores.accuracy
        record = EndToEndRecord(
            data=data.source,
            images=len(data.images),
            outputs={name: OutputScore.of(metrics) for name, metrics in scores.outputs.items()},
            reference_accuracy=accuracy.reference_top1 if accuracy else None,
            accuracy=accuracy.top1 if accuracy else None,
            accuracy_drop=accuracy.drop_points if accuracy else None,
        )
    if problems:
        # The build's own approximations cost quality too: the fix may be there.
        hints = [
            hint
            for hint, applies in (
                (
                    "guide more steps (raise generation.guidance_end)",
                    profile.generation.guidance_end is not None,
                ),
                (
                    "forecast fewer steps (lower generation.taylorseer_interval)",
                    (profile.generation.taylorseer_interval or 1) > 1,
                ),
                ("merge fewer tokens (lower model.token_merging)", profile.model.token_merging > 0),
                (
                    "reuse the UNet's features less (lower model.deep_cache)",
                    profile.model.deep_cache > 0,
                ),
                (
                    "skip the transformer's blocks less (lower model.first_block_cache)",
                    profile.model.first_block_cache > 0,
                ),
                (
                    "merge fewer of the UNet's tokens (lower model.token_merging_ratio)",
                    profile.model.token_merging_ratio > 0,
                ),
            )
            if applies
        ]
        raise ValidationError(
            f"end-to-end quality {where} missed the profile's bounds: {'; '.join(problems)}. "
            "Pick a milder scheme (or keep a component in fp32 with [components.<name>] "
            'scheme = "none")'
            + "".join(f", {hint}" for hint in hints)
            + ", or loosen [validation] if this is expected"
        )
    return record


def _tensor_problems(scores: Scores, profile: Profile) -> list[str]:
    settings = profile.validation
    # Real images: gate direction, noise and the predicted class; max-abs is gated per
    # component on random inputs already.
    tolerance = Tolerance(
        math.inf, settings.min_cosine, settings.min_top1_agreement, settings.min_sqnr_db
    )
    problems = [
        f"output '{name}': {problem}"
        for name, metrics in scores.outputs.items()
        for problem in metrics.misses(tolerance)
    ]
    bound, accuracy = settings.max_accuracy_drop, scores.accuracy
    if bound is not None and accuracy is not None and accuracy.drop_points > bound:
        problems.append(
            f"top-1 accuracy {100 * accuracy.top1:.2f}% is {accuracy.drop_points:.2f} points "
            f"below torch fp32's {100 * accuracy.reference_top1:.2f}% "
            f"(validation.max_accuracy_drop = {bound})"
        )
    return problems


def _image_problems(scores: Scores, profile: Profile) -> list[str]:
    settings = profile.validation
    problems = []
    worst_psnr, worst_ssim = min(scores.psnr_db), min(scores.ssim)
    if settings.min_psnr_db is not None and worst_psnr < settings.min_psnr_db:
        problems.append(
            f"PSNR {worst_psnr:.1f} dB < validation.min_psnr_db = {settings.min_psnr_db}"
        )
    if settings.min_ssim is not None and worst_ssim < settings.min_ssim:
        problems.append(f"SSIM {worst_ssim:.4f} < validation.min_ssim = {settings.min_ssim}")
    return problems


__all__ = ["check", "real_data", "reference", "wanted"]
