"""The sdxl family's pipeline: SD's (pipelines/diffusion.py) with SDXL's two text encoders,
pooled embedding and size ids, and its VAE's per-channel latent statistics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from modelkiln.diffusion.denoise import Conditioning, Vae
from modelkiln.diffusion.request import Request
from modelkiln.errors import UnsupportedError
from modelkiln.pipelines.base import run_padded
from modelkiln.pipelines.diffusion import SDPipeline
from modelkiln.runtimes.base import Session


class SDXLPipeline(SDPipeline):
    """SDXL: two text encoders (the penultimate hidden states, side by side), the second's
    pooled embedding, and the size (or aesthetic score) ids the UNet is conditioned on."""

    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    # (diffusers' SDXL inpainting pipeline alone keeps SD's 7.5)
    default_guidance: ClassVar[Mapping[str, float]] = {"text": 5.0, "image": 5.0, "inpaint": 7.5}
    default_image_strength: ClassVar[float] = 0.3
    default_inpaint_strength: ClassVar[float] = 0.9999
    aesthetic_score: ClassVar[float] = 6.0
    negative_aesthetic_score: ClassVar[float] = 2.5

    def _conditioning(self, request: Request) -> Conditioning:
        hidden, pooled = self._encode_both(request.prompts)
        time_ids, negative_time_ids = self._time_ids(request)
        repeat = request.num_images
        hidden, pooled = np.repeat(hidden, repeat, axis=0), np.repeat(pooled, repeat, axis=0)
        batch = request.batch
        if request.guidance <= 1.0:
            return Conditioning(
                hidden, {"text_embeds": pooled, "time_ids": np.repeat(time_ids, batch, axis=0)}
            )
        if request.negatives is None and self.model_info.get("force_zeros_for_empty_prompt", True):
            negative_hidden, negative_pooled = np.zeros_like(hidden), np.zeros_like(pooled)
        else:
            negatives = request.negatives or [""] * len(request.prompts)
            negative_hidden, negative_pooled = self._encode_both(negatives)
            negative_hidden = np.repeat(negative_hidden, repeat, axis=0)
            negative_pooled = np.repeat(negative_pooled, repeat, axis=0)
        time_ids, negative_time_ids = (
            np.repeat(time_ids, batch, axis=0),
            np.repeat(negative_time_ids, batch, axis=0),
        )
        return Conditioning(
            np.concatenate([negative_hidden, hidden]),
            {
                "text_embeds": np.concatenate([negative_pooled, pooled]),
                "time_ids": np.concatenate([negative_time_ids, time_ids]),
            },
        )

    def _encode_both(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Both encoders' penultimate hidden states side by side, and the pooled embedding of
        the encoder that has one (diffusers: the first whose first output is 2-D)."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self._tokenizers, self.text_encoders, strict=True):
            outputs = run_padded(self.sessions[encoder], {"input_ids": tokenizer(prompts)})
            hidden.append(penultimate_hidden_state(outputs))
            if pooled is None and "text_embeds" in outputs:
                pooled = outputs["text_embeds"]
        if pooled is None:
            raise UnsupportedError("this SDXL artifact's text encoders export no text_embeds")
        return np.concatenate(hidden, axis=-1), pooled

    def _time_ids(self, request: Request) -> tuple[np.ndarray, np.ndarray]:
        size = (request.height, request.width)
        positive: tuple[float, ...] = (*size, 0, 0, *size)
        negative = positive
        if request.mode != "text" and self.model_info.get("requires_aesthetics_score"):
            positive = (*size, 0, 0, self.aesthetic_score)
            negative = (*size, 0, 0, self.negative_aesthetic_score)
        return (
            np.asarray([positive], dtype=np.float32),
            np.asarray([negative], dtype=np.float32),
        )

    def _make_vae(self, sessions: Mapping[str, Session], config: Mapping[str, Any]) -> Vae:
        vae = super()._make_vae(sessions, config)
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is None or std is None:
            return vae
        return replace(
            vae,
            latents_mean=np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1),
            latents_std=np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1),
        )


def penultimate_hidden_state(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """A CLIP encoder's hidden_states.N output before the last: what SDXL and SD3 condition
    on (diffusers' hidden_states[-2], clip_skip None)."""
    states = sorted(
        (name for name in outputs if name.startswith("hidden_states.")),
        key=lambda name: int(name.rsplit(".", 1)[1]),
    )
    return outputs[states[-2]]


__all__ = ["SDXLPipeline", "penultimate_hidden_state"]
