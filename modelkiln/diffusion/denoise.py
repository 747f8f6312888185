"""The denoising loop of Stable Diffusion's pipelines in numpy, over Sessions.

One loop serves text-to-image, image-to-image and inpainting, for SD 1.x/2.x and SDXL: what
differs between families is only the conditioning (encoder_hidden_states, and SDXL's pooled
text embeddings and size ids), which the caller prepares. The order of every noise draw is
diffusers' (image latents, then the starting noise, then the masked image, then the steps),
so that a generator reproducing torch's gives diffusers' pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from modelkiln.diffusion.schedulers.base import NoiseSource, Scheduler
from modelkiln.errors import UnsupportedError
from modelkiln.pipelines.base import run_padded
from modelkiln.runtimes.base import Session
from modelkiln.specs import conform

StepCallback = Callable[[int, float, np.ndarray], None]


@dataclass(frozen=True)
class Conditioning:
    """What the UNet reads besides latents and timestep: the negative half first when guided."""

    encoder_hidden_states: np.ndarray
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)  # SDXL: text_embeds, time_ids


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
        return (self.scaling_factor * latents).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        if self.latents_mean is not None and self.latents_std is not None:
            latents = latents * self.latents_std / self.scaling_factor + self.latents_mean
        else:
            latents = latents / self.scaling_factor
        return run_padded(self.decoder, {"latent_sample": latents.astype(np.float32)})["sample"]


@dataclass(frozen=True)
class Inpainting:
    """An inpainting run's mask and kept image, at latent resolution."""

    mask: np.ndarray  # (batch, 1, h, w): 1 where the image is repainted
    masked_image_latents: np.ndarray  # (batch, 4, h, w)
    # A 4-channel UNet repaints everywhere: the kept region is put back after every step.
    # A 9-channel inpainting UNet reads the mask and the kept image instead (None here).
    image_latents: np.ndarray | None
    noise: np.ndarray

    @property
    def unet_reads_mask(self) -> bool:
        return self.image_latents is None


def start_timesteps(scheduler: Scheduler, steps: int, strength: float) -> np.ndarray:
    """The timesteps a run of `strength` goes through (all of them at strength 1), with the
    scheduler told where it starts: diffusers' get_timesteps."""
    scheduler.set_timesteps(steps)
    kept = min(int(steps * strength), steps)
    begin = max(steps - kept, 0) * scheduler.order
    scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def denoise(
    unet: Session,
    scheduler: Scheduler,
    latents: np.ndarray,
    timesteps: np.ndarray,
    conditioning: Conditioning,
    guidance: float,
    generator: NoiseSource,
    *,
    inpainting: Inpainting | None = None,
    on_step: StepCallback | None = None,
) -> np.ndarray:
    """Run the UNet and the scheduler over `timesteps`; the final latents."""
    guided = guidance > 1.0
    mask = masked = None
    if inpainting is not None and inpainting.unet_reads_mask:
        mask, masked = inpainting.mask, inpainting.masked_image_latents
        if guided:
            mask, masked = np.concatenate([mask] * 2), np.concatenate([masked] * 2)
    for index, timestep in enumerate(timesteps):
        model_input = np.concatenate([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, timestep)
        if mask is not None and masked is not None:
            model_input = np.concatenate([model_input, mask, masked], axis=1)
        noise_prediction = _unet(unet, model_input, float(timestep), conditioning)
        if guided:
            unconditional, text = np.split(noise_prediction, 2)
            noise_prediction = unconditional + guidance * (text - unconditional)
        latents = scheduler.step(noise_prediction, timestep, latents, generator)
        if inpainting is not None and not inpainting.unet_reads_mask:
            latents = _keep_unmasked(scheduler, timesteps, index, latents, inpainting)
        if on_step is not None:
            on_step(index, float(timestep), latents)
    return latents


def _unet(
    unet: Session, sample: np.ndarray, timestep: float, conditioning: Conditioning
) -> np.ndarray:
    feeds = {
        "sample": sample,
        "timestep": np.asarray(timestep),
        "encoder_hidden_states": conditioning.encoder_hidden_states,
        **conditioning.extra,
    }
    # In the UNet's own dtypes: an OpenVINO UNet takes GenAI's int64 timestep of shape (1,).
    specs = unet.input_specs
    return run_padded(unet, {name: conform(value, specs[name]) for name, value in feeds.items()})[
        "out_sample"
    ]


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


__all__ = ["Conditioning", "Inpainting", "StepCallback", "Vae", "denoise", "start_timesteps"]
