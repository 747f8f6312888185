"""What the SD and SDXL test files share: inputs, diffusers references, image comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# The project's own PSNR (8-bit images, inf when identical), re-exported for the tests.
from modelkiln.image_quality import psnr as psnr

PROMPT = "a photo of a cat"
STEPS = 3
SIZE = 32


def init_image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def half_mask(size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """White (repaint) in the middle; an all-white mask would zero the masked image, where
    GroupNorm on a constant input differs between backends for reasons unrelated to export."""
    mask = np.zeros(size, np.uint8)
    mask[size[0] // 4 : 3 * size[0] // 4, size[1] // 4 : 3 * size[1] // 4] = 255
    return Image.fromarray(mask)


def modes() -> dict[str, dict[str, Any]]:
    """The three entry points with their extra arguments."""
    return {
        "text": {},
        "image": {"image": init_image(), "strength": 0.7},
        "inpaint": {"image": init_image(), "mask": half_mask(), "strength": 0.9},
    }


def generate(pipeline: Any, mode: str, **settings: Any) -> Image.Image:
    extra = {**modes()[mode], **settings}
    extra.setdefault("steps", STEPS)
    extra.setdefault("seed", 0)
    if mode == "text":
        return pipeline.text_to_image(PROMPT, **extra)[0]
    if mode == "image":
        image = extra.pop("image")
        return pipeline.image_to_image(PROMPT, image, **extra)[0]
    image, mask = extra.pop("image"), extra.pop("mask")
    return pipeline.inpaint(PROMPT, image, mask, **extra)[0]


# kiln's scheduler names -> (diffusers class, config overrides): the same list the runtime has.
DIFFUSERS_SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def diffusers_reference(
    source: Path,
    mode: str,
    scheduler: str | None = None,
    loras: tuple[tuple[Path, float], ...] = (),
    **arguments: Any,
) -> Image.Image:
    """diffusers' own pipeline on the source model: the same seed, steps, size, image and
    strength as generate(); guidance and everything else at diffusers' defaults, as ours.
    `loras`: (file, scale) fused as a diffusers user does (load_lora_weights, fuse_lora)."""
    import diffusers

    index = json.loads((source / "model_index.json").read_text())
    prefix = "StableDiffusionXL" if "XL" in index["_class_name"] else "StableDiffusion"
    suffix = {"text": "Pipeline", "image": "Img2ImgPipeline", "inpaint": "InpaintPipeline"}[mode]
    pipeline = getattr(diffusers, prefix + suffix).from_pretrained(source)
    pipeline.set_progress_bar_config(disable=True)
    for index_, (file, scale) in enumerate(loras):
        pipeline.load_lora_weights(str(file), adapter_name=f"user_{index_}")
        pipeline.fuse_lora(lora_scale=scale, adapter_names=[f"user_{index_}"])
        pipeline.unload_lora_weights()
    if scheduler is not None:
        class_name, overrides = DIFFUSERS_SCHEDULERS[scheduler]
        scheduler_class = getattr(diffusers, class_name)
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config, **overrides)
    return pipeline(PROMPT, **diffusers_call(mode, arguments)).images[0]


def diffusers_call(mode: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A diffusers pipeline call's arguments as generate() makes its own: seed 0, STEPS, SIZE,
    and the mode's image, strength and mask."""
    import torch

    call: dict[str, Any] = {
        "num_inference_steps": STEPS,
        "generator": torch.Generator().manual_seed(0),
        "height": SIZE,
        "width": SIZE,
        **arguments,
    }
    if mode in ("image", "inpaint"):
        call["image"] = modes()[mode]["image"]
        call["strength"] = modes()[mode]["strength"]
    if mode == "inpaint":
        call["mask_image"] = half_mask()
    return call


def optimum_layout(artifact: Path, model_file: str, xl: bool) -> set[str]:
    """The files optimum's ORT/OV diffusion pipelines look for."""
    components = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    if xl:
        components.append("text_encoder_2")
    expected = {"model_index.json", "scheduler/scheduler_config.json", "kiln.json"}
    expected |= {f"{c}/{model_file}" for c in components} | {f"{c}/config.json" for c in components}
    for folder in ["tokenizer", "tokenizer_2"] if xl else ["tokenizer"]:
        expected |= {
            f"{folder}/{name}" for name in ("tokenizer_config.json", "vocab.json", "merges.txt")
        }
    return expected


def assert_build_refused(
    source: Path, profile: str, out: Path, overrides: list[str], error: type, message: str
) -> None:
    """The build raises `error` matching `message` and leaves nothing at `out` (atomic)."""
    from modelkiln import build

    with pytest.raises(error, match=message):
        build(source, profile, out, overrides=overrides)
    assert not out.exists()
