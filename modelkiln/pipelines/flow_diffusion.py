"""The sd3 and flux families' pipelines, in numpy: SD 3 / 3.5 text-to-image, image-to-image and
inpainting, Flux.1 text-to-image and image-to-image, on every backend.

They reproduce diffusers' StableDiffusion3[Img2Img|Inpaint]Pipeline and Flux[Img2Img]Pipeline
on the loop, noise, VAE and tokenizers the SD pipelines use (pipelines/diffusion.py), with a
flow-matching scheduler; what they change is the prompt encoding (two CLIPs and T5), the
transformer's call and, for Flux, the 2×2 packing of latents into tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from modelkiln.diffusion.block_cache import (
    TRANSFORMER_HEAD,
    TRANSFORMER_OUTPUT,
    FirstBlockCacheDenoiser,
    TransformerFeeds,
)
from modelkiln.diffusion.denoise import Conditioning, Denoiser, run_conformed, start_timesteps
from modelkiln.diffusion.noise import TorchGenerator
from modelkiln.diffusion.request import Request
from modelkiln.diffusion.schedulers import Scheduler
from modelkiln.diffusion.schedulers.flow_match import FlowMatchEulerDiscrete
from modelkiln.diffusion.tokenizer import T5Tokenizer
from modelkiln.errors import InputError, UnsupportedError
from modelkiln.pipelines.base import run_padded
from modelkiln.pipelines.diffusion import SDPipeline
from modelkiln.pipelines.sdxl import penultimate_hidden_state
from modelkiln.runtimes.base import Session

# Flux's token positions: one row per token, shared by every image of a batch.
POSITIONS = frozenset({"img_ids", "txt_ids"})


class FlowPipeline(SDPipeline):
    """What SD3 and Flux share: a transformer, a flow-matching scheduler, T5, and diffusers'
    rounding of the steps an image-to-image run skips."""

    # The T5 encoder's session and its tokenizer folder (an SD3 artifact may have neither).
    t5_encoder: ClassVar[str]
    t5_tokenizer: ClassVar[str]
    stages: ClassVar[Mapping[str, str]] = {
        "transformer": "transformer_step",
        TRANSFORMER_HEAD: "transformer_head_step",
        "vae_encoder": "vae_encode",
        "vae_decoder": "vae_decode",
    }
    # First Block Cache's head alternates with the transformer: low_memory keeps it open apart.
    resident_apart: ClassVar[frozenset[str]] = frozenset({TRANSFORMER_HEAD})
    default_steps: ClassVar[Mapping[str, int]] = {"text": 28, "image": 50, "inpaint": 50}
    default_image_strength: ClassVar[float] = 0.6
    default_inpaint_strength: ClassVar[float] = 0.6

    def __init__(
        self,
        root: Path,
        sessions: Mapping[str, Session],
        configs: Mapping[str, Mapping[str, Any]],
        model_info: Mapping[str, Any],
        task: str = "text-to-image",
    ) -> None:
        super().__init__(root, sessions, configs, model_info, task)
        self._t5 = (
            T5Tokenizer.from_folder(root / self.t5_tokenizer)
            if self.t5_encoder in sessions
            else None
        )

    def _check_caching(self, request: Request) -> None:
        """A transformer has First Block Cache's step cache, not DeepCache's."""
        if request.cache_interval > 1:
            raise UnsupportedError(
                "cache_interval reuses a UNet's deep features (SD 1.x/2.x, SDXL); this "
                "pipeline's denoiser is a transformer: leave cache_interval at 1 and skip its "
                "later blocks with cache_threshold (model.first_block_cache)"
            )

    def _denoiser(self, request: Request) -> Denoiser:
        """The transformer on every step, or First Block Cache's pair where the call's
        cache_threshold is above 0."""
        transformer = self.sessions["transformer"]
        feeds, unbatched = self._transformer_feeds(request, transformer)
        threshold = request.cache_threshold
        if threshold > 0:
            head = self.sessions.get(TRANSFORMER_HEAD)
            if head is None:
                raise UnsupportedError(
                    f"cache_threshold {threshold} skips the transformer's later blocks, and "
                    f"this artifact has no {TRANSFORMER_HEAD}: rebuild it with --set "
                    f"model.first_block_cache={threshold}, or run with cache_threshold 0"
                )
            return FirstBlockCacheDenoiser(transformer, head, threshold, feeds, unbatched)

        def predict(sample: np.ndarray, timestep: float, conditioning: Conditioning) -> np.ndarray:
            outputs = run_conformed(transformer, feeds(sample, timestep, conditioning), unbatched)
            return outputs[TRANSFORMER_OUTPUT]

        return predict

    def _transformer_feeds(
        self, request: Request, transformer: Session
    ) -> tuple[TransformerFeeds, frozenset[str]]:
        """The transformer's feeds for one call, and those not batched (Flux's positions)."""
        raise NotImplementedError

    def _check_denoiser(self, configs: Mapping[str, Mapping[str, Any]]) -> None:
        """Nothing to refuse up front (SD's check is of a UNet's config); the scheduler is
        checked per call (_scheduler)."""

    def _scheduler(self, name: str | None) -> Scheduler:
        scheduler = super()._scheduler(name)
        if not isinstance(scheduler, FlowMatchEulerDiscrete):
            raise InputError(
                f"scheduler '{name}' is a noise-prediction scheduler; this {self._kind} artifact "
                "was trained for flow matching: use flow-match-euler (its default)"
            )
        return scheduler

    @property
    def _kind(self) -> str:
        return "SD3"

    def _timesteps(self, request: Request, scheduler: Scheduler) -> np.ndarray:
        strength = 1.0 if request.mode == "text" else request.strength
        return start_timesteps(
            scheduler, request.steps, strength, round_kept=False, **self._schedule(request)
        )

    def _schedule(self, request: Request) -> dict[str, Any]:
        """set_timesteps' settings: mu where the scheduler shifts by resolution."""
        config = self._scheduler_config
        if not config.get("use_dynamic_shifting"):
            return {}
        return {"mu": self._mu(self._image_tokens(request))}

    def _image_tokens(self, request: Request) -> int:
        patch = int(self.model_info.get("patch_size", 2))
        step = self._vae.pixels_per_latent
        return (request.height // step // patch) * (request.width // step // patch)

    def _mu(self, image_tokens: int) -> float:
        """diffusers' calculate_shift: mu grows linearly with the image's token count."""
        config = self._scheduler_config
        base, most = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (high - low) / (most - base)
        return float(image_tokens * slope + (low - slope * base))

    def _t5_states(self, prompts: list[str], count: int) -> np.ndarray:
        """T5's last hidden state per prompt, `count` times each (zeros without T5, as SD3)."""
        length = int(self.model_info["t5_sequence_length"])
        if self._t5 is None:
            width = int(self.model_info["joint_attention_dim"])
            return np.zeros((len(prompts) * count, length, width), dtype=np.float32)
        ids = self._t5(prompts, length)
        states = run_padded(self.sessions[self.t5_encoder], {"input_ids": ids})
        return np.repeat(states["last_hidden_state"], count, axis=0)

    def _clip(self, index: int, prompts: list[str]) -> dict[str, np.ndarray]:
        encoder = self.text_encoders[index]
        return run_padded(self.sessions[encoder], {"input_ids": self._tokenizers[index](prompts)})


class SD3Pipeline(FlowPipeline):
    """SD 3 / 3.5: CLIP-L and CLIP-G penultimate states side by side, padded to T5's width and
    followed by T5's tokens; both CLIPs' pooled embeddings; classifier-free guidance."""

    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    t5_encoder: ClassVar[str] = "text_encoder_3"
    t5_tokenizer: ClassVar[str] = "tokenizer_3"
    default_guidance: ClassVar[Mapping[str, float]] = {"text": 7.0, "image": 7.0, "inpaint": 7.0}

    @property
    def inpainting_only(self) -> bool:
        return int(self.model_info.get("transformer_in_channels", 16)) == 33

    def _transformer_feeds(
        self, request: Request, transformer: Session
    ) -> tuple[TransformerFeeds, frozenset[str]]:
        def feeds(
            sample: np.ndarray, timestep: float, conditioning: Conditioning
        ) -> dict[str, np.ndarray]:
            return {
                "hidden_states": sample,
                "timestep": np.full(sample.shape[0], timestep, dtype=np.float32),
                "encoder_hidden_states": conditioning.encoder_hidden_states,
                **conditioning.extra,
            }

        return feeds, frozenset()

    def _conditioning(self, request: Request) -> Conditioning:
        hidden, pooled = self._encode_all(request.prompts, request.num_images)
        if request.guidance <= 1.0:
            return Conditioning(hidden, {"pooled_projections": pooled})
        negatives = request.negatives or [""] * len(request.prompts)
        negative_hidden, negative_pooled = self._encode_all(negatives, request.num_images)
        return Conditioning(
            np.concatenate([negative_hidden, hidden]),
            {"pooled_projections": np.concatenate([negative_pooled, pooled])},
        )

    def _encode_all(self, prompts: list[str], count: int) -> tuple[np.ndarray, np.ndarray]:
        """(CLIP tokens then T5 tokens, pooled embeddings) per prompt, `count` times each."""
        states, pooled = [], []
        for index in range(len(self.text_encoders)):
            outputs = self._clip(index, prompts)
            states.append(penultimate_hidden_state(outputs))
            pooled.append(outputs["text_embeds"])
        clip = np.repeat(np.concatenate(states, axis=-1), count, axis=0)
        t5 = self._t5_states(prompts, count)
        padding = t5.shape[-1] - clip.shape[-1]
        if padding < 0:
            raise UnsupportedError(
                f"the CLIP encoders' {clip.shape[-1]} features do not fit the transformer's "
                f"{t5.shape[-1]}: this is not an SD3 pipeline modelkiln knows"
            )
        clip = np.pad(clip, ((0, 0), (0, 0), (0, padding)))
        hidden = np.concatenate([clip, t5], axis=1).astype(np.float32)
        return hidden, np.repeat(np.concatenate(pooled, axis=-1), count, axis=0)


class FluxPipeline(FlowPipeline):
    """Flux.1: CLIP-L's pooled embedding and T5's tokens, no classifier-free guidance: dev
    embeds the guidance scale instead, schnell takes none. Latents travel packed, 2×2 patches
    per token, with their grid positions (img_ids) beside the text's (txt_ids, zeros)."""

    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    t5_encoder: ClassVar[str] = "text_encoder_2"
    t5_tokenizer: ClassVar[str] = "tokenizer_2"
    default_steps: ClassVar[Mapping[str, int]] = {"text": 28, "image": 28, "inpaint": 28}
    # FluxPipeline's guidance_scale 3.5; FluxImg2ImgPipeline's 7.0.
    default_guidance: ClassVar[Mapping[str, float]] = {"text": 3.5, "image": 7.0, "inpaint": 7.0}

    @property
    def _kind(self) -> str:
        return "Flux"

    def inpaint(self, prompt: Any, image: Any, mask: Any, **settings: Any) -> Any:
        raise UnsupportedError(
            "modelkiln runs Flux text-to-image and image-to-image; inpainting needs Flux Fill, "
            "which it does not support yet"
        )

    def _request(self, mode: str, prompt: Any, settings: Mapping[str, Any]) -> Request:
        if settings.get("negative_prompt") is not None:
            raise UnsupportedError(
                "Flux takes no negative prompt: it is distilled without classifier-free "
                "guidance; describe what you want instead"
            )
        request = super()._request(mode, prompt, settings)
        pixels = 2 * self._vae.pixels_per_latent
        if request.height % pixels or request.width % pixels:
            raise InputError(
                f"Flux images are multiples of {pixels} pixels per side (2×2 latents of "
                f"{self._vae.pixels_per_latent} pixels make one token), got "
                f"{request.width}×{request.height}"
            )
        return request

    def _guidance_scale(self, request: Request) -> float:
        return 1.0  # the guidance scale goes into the transformer, not into a second batch

    def _schedule(self, request: Request) -> dict[str, Any]:
        """FluxPipeline's schedule: sigmas 1 .. 1/steps, shifted by mu (always passed)."""
        steps = request.steps
        return {
            "sigmas": np.linspace(1.0, 1 / steps, steps),
            "mu": self._mu(self._image_tokens(request)),
        }

    def _image_tokens(self, request: Request) -> int:
        step = 2 * self._vae.pixels_per_latent
        return (request.height // step) * (request.width // step)

    def _start(
        self,
        request: Request,
        scheduler: Scheduler,
        timesteps: np.ndarray,
        generator: TorchGenerator,
    ) -> tuple[np.ndarray, Any]:
        latents, inpainting = super()._start(request, scheduler, timesteps, generator)
        return _pack(latents), inpainting

    def _unpacked(self, latents: np.ndarray, request: Request) -> np.ndarray:
        step = self._vae.pixels_per_latent
        return _unpack(latents, request.height // step, request.width // step)

    def _transformer_feeds(
        self, request: Request, transformer: Session
    ) -> tuple[TransformerFeeds, frozenset[str]]:
        step = self._vae.pixels_per_latent
        img_ids = _image_ids(request.height // step // 2, request.width // step // 2)
        length = int(self.model_info["t5_sequence_length"])
        txt_ids = np.zeros((length, 3), dtype=np.float32)
        guided = "guidance" in transformer.input_specs

        def feeds(
            sample: np.ndarray, timestep: float, conditioning: Conditioning
        ) -> dict[str, np.ndarray]:
            batch = sample.shape[0]
            values = {
                "hidden_states": sample,
                "encoder_hidden_states": conditioning.encoder_hidden_states,
                **conditioning.extra,
                # diffusers divides the scheduler's timestep (1000 * sigma) by 1000.
                "timestep": np.full(batch, np.float32(timestep) / np.float32(1000)),
                "img_ids": img_ids,
                "txt_ids": txt_ids,
            }
            if guided:
                values["guidance"] = np.full(batch, request.guidance, dtype=np.float32)
            return values

        return feeds, POSITIONS

    def _conditioning(self, request: Request) -> Conditioning:
        pooled = self._clip(0, request.prompts)["pooler_output"]
        pooled = np.repeat(pooled, request.num_images, axis=0)
        t5 = self._t5_states(request.prompts, request.num_images)
        return Conditioning(t5, {"pooled_projections": pooled})


def _pack(latents: np.ndarray) -> np.ndarray:
    """(batch, c, h, w) -> (batch, h/2 * w/2, 4c): diffusers' _pack_latents."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2)
    patches = patches.transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(patches.reshape(batch, (height // 2) * (width // 2), channels * 4))


def _unpack(tokens: np.ndarray, height: int, width: int) -> np.ndarray:
    """The inverse of _pack for latents of (height, width)."""
    batch, _, features = tokens.shape
    patches = tokens.reshape(batch, height // 2, width // 2, features // 4, 2, 2)
    patches = patches.transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(patches.reshape(batch, features // 4, height, width))


def _image_ids(rows: int, columns: int) -> np.ndarray:
    """Each image token's (0, row, column): diffusers' _prepare_latent_image_ids."""
    ids = np.zeros((rows, columns, 3), dtype=np.float32)
    ids[..., 1] = np.arange(rows, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(columns, dtype=np.float32)[None, :]
    return ids.reshape(rows * columns, 3)


__all__ = ["FluxPipeline", "SD3Pipeline"]
