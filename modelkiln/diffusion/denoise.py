"""The denoising loop of the diffusion pipelines in numpy, over Sessions.

One loop serves text-to-image, image-to-image and inpainting, for SD 1.x/2.x, SDXL, SD3 and
Flux: what differs between families is the denoiser's call (a UNet's or a transformer's
inputs) and the conditioning (text embeddings, SDXL's pooled embeddings and size ids, SD3's
pooled projections, Flux's positions), which the caller prepares. The order of every noise
draw is diffusers' (image latents, then the starting noise, then the masked image, then the
steps), so that a generator reproducing torch's gives diffusers' pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from modelkiln.diffusion.schedulers.base import NoiseSource, Scheduler
from modelkiln.errors import UnsupportedError
from modelkiln.pipelines.base import run_padded
from modelkiln.runtimes.base import Session
from modelkiln.specs import conform

StepCallback = Callable[[int, float, np.ndarray], None]


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser reads besides latents and timestep: the negative half first when
    guided."""

    encoder_hidden_states: np.ndarray
    # SDXL: text_embeds, time_ids; SD3: pooled_projections; Flux: those and positions.
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)

    def half(self, index: int) -> Conditioning:
        """The negative (0) or positive (1) half of a guided conditioning: every array with
        one row per sample split; the rest (Flux's token positions) as they are."""
        rows = len(self.encoder_hidden_states)

        def part(array: np.ndarray) -> np.ndarray:
            return np.split(array, 2)[index] if array.ndim and len(array) == rows else array

        return Conditioning(
            part(self.encoder_hidden_states), {k: part(v) for k, v in self.extra.items()}
        )


# One denoiser call: (latents, timestep, conditioning) -> the model's prediction.
Denoiser = Callable[[np.ndarray, float, Conditioning], np.ndarray]


@runtime_checkable
class StepAware(Protocol):
    """A denoiser that is told where each step begins (one that reuses work across steps):
    its calls until the next start_step belong to step `index`, guided or not."""

    def start_step(self, index: int, guided: bool) -> None: ...


@dataclass(frozen=True)
class Vae:
    """The VAE's two halves and the constants that scale its latents."""

    decoder: Session
    encoder: Session | None
    scaling_factor: float
    # Pixels per latent along each side (8 for SD; 2 ** (downsampling blocks)) and channels.
    pixels_per_latent: int = 8
    latent_channels: int = 4
    # SDXL-style VAEs may normalise latents per channel (None: they do not).
    latents_mean: np.ndarray | None = None
    latents_std: np.ndarray | None = None
    # SD3 and Flux VAEs shift latents before scaling them.
    shift_factor: float = 0.0

    def encode(self, pixels: np.ndarray, generator: NoiseSource) -> np.ndarray:
        """Scaled latents sampled from the encoder's distribution (one noise draw)."""
        if self.encoder is None:
            raise UnsupportedError("this artifact has no vae_encoder: rebuild it with one")
        moments = run_padded(self.encoder, {"sample": pixels})["latent_parameters"]
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        latents = mean + std * generator.randn(mean.shape)
        if self.latents_mean is not None and self.latents_std is not None:
            return ((latents - self.latents_mean) * self.scaling_factor / self.latents_std).astype(
                np.float32
            )
        return ((latents - self.shift_factor) * self.scaling_factor).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        if self.latents_mean is not None and self.latents_std is not None:
            latents = latents * self.latents_std / self.scaling_factor + self.latents_mean
        else:
            latents = latents / self.scaling_factor + self.shift_factor
        return run_padded(self.decoder, {"latent_sample": latents.astype(np.float32)})["sample"]


@dataclass(frozen=True)
class Inpainting:
    """An inpainting run's mask and kept image, at latent resolution."""

    mask: np.ndarray  # (batch, 1, h, w): 1 where the image is repainted
    masked_image_latents: np.ndarray  # (batch, latent channels, h, w)
    # A 4-channel UNet repaints everywhere: the kept region is put back after every step.
    # A 9-channel inpainting UNet reads the mask and the kept image instead (None here).
    image_latents: np.ndarray | None
    noise: np.ndarray

    @property
    def unet_reads_mask(self) -> bool:
        return self.image_latents is None


def start_timesteps(
    scheduler: Scheduler,
    steps: int,
    strength: float,
    *,
    round_kept: bool = True,
    **schedule: Any,
) -> np.ndarray:
    """The timesteps a run of `strength` goes through (all of them at strength 1), with the
    scheduler told where it starts: diffusers' get_timesteps. SD's pipelines round the steps
    kept down (`round_kept`); SD3's and Flux's round the steps skipped down instead (4 steps
    at strength 0.6: SD runs 2, SD3 and Flux 3). `schedule`: set_timesteps' own settings (a
    flow-matching scheduler's mu and sigmas)."""
    scheduler.set_timesteps(steps, **schedule)
    if round_kept:
        skipped = max(steps - min(int(steps * strength), steps), 0)
    else:
        skipped = int(max(steps - min(steps * strength, steps), 0))
    begin = skipped * scheduler.order
    scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def denoise(
    model: Denoiser,
    scheduler: Scheduler,
    latents: np.ndarray,
    timesteps: np.ndarray,
    conditioning: Conditioning,
    guidance: float,
    generator: NoiseSource,
    *,
    inpainting: Inpainting | None = None,
    on_step: StepCallback | None = None,
    split_guidance: bool = False,
    guidance_end: float = 1.0,
) -> np.ndarray:
    """Run the denoiser and the scheduler over `timesteps`; the final latents.

    Guided, the denoiser takes the negative and positive halves in one call of twice the
    batch (diffusers' way), or with `split_guidance` in two calls: the denoiser's activations
    are those of one half (a large transformer at 1024x1024: most of its memory). Only the
    first ceil(guidance_end × steps) steps are guided; the later ones take the positive half
    alone, which costs half the denoiser's work (late steps refine detail, where guidance
    changes the image least)."""
    guided_steps = guided_count(len(timesteps), guidance, guidance_end)
    # Unguided (a scale of 1 or less), the conditioning has the prompt's half only.
    stops_early = 0 < guided_steps < len(timesteps)
    positive = conditioning.half(1) if stops_early else conditioning
    for index, timestep in enumerate(timesteps):
        guided = index < guided_steps
        if isinstance(model, StepAware):
            model.start_step(index, guided)
        split = guided and split_guidance
        copies = 2 if guided and not split else 1
        model_input = np.concatenate([latents] * copies)
        model_input = scheduler.scale_model_input(model_input, timestep)
        if inpainting is not None and inpainting.unet_reads_mask:
            mask = np.concatenate([inpainting.mask] * copies)
            masked = np.concatenate([inpainting.masked_image_latents] * copies)
            model_input = np.concatenate([model_input, mask, masked], axis=1)
        if split:
            unconditional, text = (
                model(model_input, float(timestep), conditioning.half(half)) for half in (0, 1)
            )
            noise_prediction = unconditional + guidance * (text - unconditional)
        elif guided:
            unconditional, text = np.split(model(model_input, float(timestep), conditioning), 2)
            noise_prediction = unconditional + guidance * (text - unconditional)
        else:
            noise_prediction = model(model_input, float(timestep), positive)
        latents = scheduler.step(noise_prediction, timestep, latents, generator)
        if inpainting is not None and not inpainting.unet_reads_mask:
            latents = _keep_unmasked(scheduler, timesteps, index, latents, inpainting)
        if on_step is not None:
            on_step(index, float(timestep), latents)
    return latents


def guided_count(steps: int, guidance: float, guidance_end: float) -> int:
    """How many of `steps` (the first ones) run classifier-free guidance: none at a scale
    of 1 or less, else the first ceil(guidance_end × steps), at least one."""
    if guidance <= 1.0:
        return 0
    return max(1, min(steps, math.ceil(guidance_end * steps - 1e-9)))


def unet_denoiser(unet: Session) -> Denoiser:
    """SD's and SDXL's UNet: sample, a scalar timestep, the conditioning -> out_sample."""

    def predict(sample: np.ndarray, timestep: float, conditioning: Conditioning) -> np.ndarray:
        return run_conformed(unet, unet_feeds(sample, timestep, conditioning))["out_sample"]

    return predict


class StepCalls:
    """For a denoiser that keeps work between steps: which call of its step a call is (split
    guidance makes two per step, each keeping its own), and whether a step's batch differs
    from the last one's (guidance ended: what was kept belongs to the other batch)."""

    def __init__(self) -> None:
        self._guided: bool | None = None
        self._next = 0

    def start(self, guided: bool) -> bool:
        """A new step begins; True where its batch differs from the last step's."""
        changed = guided != self._guided
        self._guided, self._next = guided, 0
        return changed

    def next(self) -> int:
        call, self._next = self._next, self._next + 1
        return call


# The UNet's output that DeepCache keeps, and the component that takes it back: the shallow
# UNet (models/deep_cache.py builds both).
DEEP_FEATURES = "deep_features"
SHALLOW_UNET = "unet_shallow"


class DeepCacheDenoiser:
    """DeepCache (Ma et al., 2023) over a UNet exported with `deep_features` and its
    shallow half (models/deep_cache.py): the whole UNet runs on one step in `interval`
    and its deep features are kept; the steps between run the shallow UNet on them. A step
    whose batch changed (guidance ended) runs the whole UNet again: the kept features
    belong to the guided batch. Kept per call within a step, so split guidance's two calls
    each reuse their own."""

    def __init__(self, unet: Session, shallow: Session, interval: int) -> None:
        self.unet = unet
        self.shallow = shallow
        self.interval = interval
        self._features: dict[int, np.ndarray] = {}
        self._whole = True
        self._calls = StepCalls()

    def start_step(self, index: int, guided: bool) -> None:
        batch_changed = self._calls.start(guided)
        self._whole = index % self.interval == 0 or batch_changed

    def __call__(
        self, sample: np.ndarray, timestep: float, conditioning: Conditioning
    ) -> np.ndarray:
        call = self._calls.next()
        feeds = unet_feeds(sample, timestep, conditioning)
        kept = self._features.get(call)
        if self._whole or kept is None or len(kept) != len(sample):
            outputs = run_conformed(self.unet, feeds)
            self._features[call] = outputs[DEEP_FEATURES]
            return outputs["out_sample"]
        return run_conformed(self.shallow, {**feeds, DEEP_FEATURES: kept})["out_sample"]


def unet_feeds(
    sample: np.ndarray, timestep: float, conditioning: Conditioning
) -> dict[str, np.ndarray]:
    """A UNet's inputs by name: SD's three, and SDXL's added conditioning."""
    return {
        "sample": sample,
        "timestep": np.asarray(timestep),
        "encoder_hidden_states": conditioning.encoder_hidden_states,
        **conditioning.extra,
    }


def run_conformed(
    session: Session, feeds: Mapping[str, Any], unbatched: frozenset[str] = frozenset()
) -> dict[str, np.ndarray]:
    """`feeds` in the session's own dtypes and ranks (an OpenVINO UNet takes GenAI's int64
    timestep of shape (1,)), batched as the session allows (but `unbatched`: run_padded)."""
    specs = session.input_specs
    conformed = {name: conform(value, specs[name]) for name, value in feeds.items()}
    return run_padded(session, conformed, unbatched)


def _keep_unmasked(
    scheduler: Scheduler,
    timesteps: np.ndarray,
    index: int,
    latents: np.ndarray,
    inpainting: Inpainting,
) -> np.ndarray:
    """The kept region noised to the next timestep, the repainted one from the UNet."""
    assert inpainting.image_latents is not None
    kept = inpainting.image_latents
    if index < len(timesteps) - 1:
        kept = scheduler.add_noise(kept, inpainting.noise, timesteps[index + 1 : index + 2])
    return (1 - inpainting.mask) * kept + inpainting.mask * latents


__all__ = [
    "DEEP_FEATURES",
    "SHALLOW_UNET",
    "Conditioning",
    "DeepCacheDenoiser",
    "Denoiser",
    "Inpainting",
    "StepAware",
    "StepCallback",
    "StepCalls",
    "Vae",
    "denoise",
    "guided_count",
    "run_conformed",
    "start_timesteps",
    "unet_denoiser",
    "unet_feeds",
]
