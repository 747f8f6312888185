"""Real inputs for the schemes that quantize activations, from the profile's [calibration].

Image models: images from a folder (or the digits set's training split), preprocessed as the
artifact will preprocess them. Diffusion models: prompts run through the fp32 torch
pipeline, recording what every component received — the UNet's inputs at each denoising
step, the text encoders' token ids, the VAE decoder's latents — and the VAE encoder gets the
generated images.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from modelkiln.datasets import image_set
from modelkiln.progress import Progress
from modelkiln.quantize import CALIBRATED
from modelkiln.reference import RecordingSession, generate, reference_pipeline
from modelkiln.runtimes.base import Session

if TYPE_CHECKING:
    from modelkiln.models.base import LoadedModel
    from modelkiln.profiles import Profile

Feeds = list[dict[str, np.ndarray]]


def components_to_calibrate(profile: Profile, names: Iterable[str]) -> list[str]:
    return [n for n in names if profile.for_component(n).quantization.scheme in CALIBRATED]


def collect(
    loaded: LoadedModel, profile: Profile, components: list[str], progress: Progress
) -> dict[str, Feeds]:
    """Calibration feeds for each of `components`, by input name."""
    if loaded.task in ("text-to-image", "inpainting"):
        return _from_prompts(loaded, profile, components, progress)
    return _from_images(loaded, profile, components, progress)


def _from_images(
    loaded: LoadedModel, profile: Profile, components: list[str], progress: Progress
) -> dict[str, Feeds]:
    from modelkiln.images import load_images
    from modelkiln.preprocess import ImagePreprocessor

    settings = profile.calibration
    assert settings.data is not None  # profile validation requires it
    images = image_set(settings.data, "calibration.data", "train").subset(
        settings.size, settings.seed
    )
    preprocess = ImagePreprocessor.from_dict(loaded.model_info["preprocessing"])
    (spec,) = loaded.components
    (input_name,) = spec.inputs
    batch = profile.shapes.batch_size if not profile.shapes.dynamic_batch else settings.batch_size
    feeds: Feeds = []
    with progress.task(f"preprocessing {len(images)} calibration images") as advance:
        for start in range(0, len(images) - batch + 1, batch):
            pixels = preprocess(load_images(images.images[start : start + batch]))
            feeds.append({input_name: pixels})
            advance(batch)
    return {name: feeds for name in components}


def _from_prompts(
    loaded: LoadedModel, profile: Profile, components: list[str], progress: Progress
) -> dict[str, Feeds]:
    from modelkiln.pipelines.diffusion import run_padded

    settings = profile.calibration
    recorders: dict[str, RecordingSession] = {}

    def record(session: Session) -> Session:
        if session.name not in components:
            return session
        recorders[session.name] = RecordingSession(session)
        return recorders[session.name]

    prompts = [settings.prompts[i % len(settings.prompts)] for i in range(settings.size)]
    description = f"calibrating on {len(prompts)} prompts ({settings.steps} steps each)"
    with (
        reference_pipeline(loaded, profile, wrap=record) as pipeline,
        progress.task(description, total=len(prompts)) as advance,
    ):
        for index, prompt in enumerate(prompts):
            image = generate(pipeline, prompt, seed=settings.seed + index, steps=settings.steps)
            encoder = recorders.get("vae_encoder")
            if encoder is not None:
                # text-to-image never encodes: the encoder sees the images it generated.
                pixels = np.asarray(image, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
                (input_name,) = encoder.input_specs
                run_padded(encoder, {input_name: pixels})
            advance(1)
    return {name: recorder.feeds for name, recorder in recorders.items()}


__all__ = ["collect", "components_to_calibrate"]
