"""What the SD3 and Flux test files share: diffusers' own pipelines on the tiny sources."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from diffusion_checks import PROMPT, diffusers_call
from PIL import Image

NEGATIVE = "blurry"  # SD3 takes negative prompts; Flux does not


def diffusers_flow_reference(source: Path, mode: str, **arguments: Any) -> Image.Image:
    """diffusers' SD3 / Flux pipeline on `source` with generate()'s seed, steps, size, image
    and strength, everything else at diffusers' defaults (as ours); made once per source,
    mode and settings."""
    return _reference(source, mode, tuple(sorted(arguments.items())))


@functools.cache
def _reference(source: Path, mode: str, arguments: tuple[tuple[str, Any], ...]) -> Image.Image:
    import diffusers
    import torch

    index = json.loads((source / "model_index.json").read_text())
    flux = index["_class_name"].startswith("Flux")
    prefix = "Flux" if flux else "StableDiffusion3"
    suffix = {"text": "Pipeline", "image": "Img2ImgPipeline", "inpaint": "InpaintPipeline"}[mode]
    loading: dict[str, Any] = {}
    if not flux and index.get("text_encoder_3", [None])[0] is None:
        loading = {"text_encoder_3": None, "tokenizer_3": None}  # saved without T5
    pipeline = getattr(diffusers, prefix + suffix).from_pretrained(source, **loading)
    pipeline.set_progress_bar_config(disable=True)
    call = diffusers_call(mode, dict(arguments))
    if mode != "inpaint":
        return pipeline(PROMPT, **call).images[0]
    # diffusers' SD3 inpainting decodes without the VAE's shift_factor, unlike its
    # text-to-image and image-to-image pipelines (and ours): decode its latents as they do.
    latents = pipeline(PROMPT, **call, output_type="latent").images
    vae = pipeline.vae.config
    with torch.no_grad():
        pixels = pipeline.vae.decode(latents / vae.scaling_factor + vae.shift_factor).sample
    image: Image.Image = pipeline.image_processor.postprocess(pixels, output_type="pil")[0]
    return image
