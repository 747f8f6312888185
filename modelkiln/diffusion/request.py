"""One generation call's settings, checked where they enter: prompts, counts, sizes, guidance,
strength, images; the family's defaults fill what the caller left out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from modelkiln.diffusion.denoise import StepCallback
from modelkiln.errors import InputError
from modelkiln.images import load_image
from modelkiln.profiles import MAX_GUIDANCE, MAX_IMAGES, MAX_STEPS, MAX_TAYLORSEER_ORDER
from modelkiln.progress import NullProgress, Progress

if TYPE_CHECKING:
    from PIL import Image

# Bounds of one call: past them it runs for hours or exhausts memory rather than fail.
MAX_CONTROL_SCALE = 10.0


@dataclass(frozen=True)
class Request:
    """One call's validated settings."""

    mode: str  # text, image, inpaint
    prompts: list[str]
    negatives: list[str] | None
    steps: int
    guidance: float
    seed: int
    num_images: int
    height: int
    width: int
    strength: float
    scheduler: str | None
    image: Image.Image | None
    mask: Image.Image | None
    latents: np.ndarray | None
    callback: StepCallback | None
    progress: Progress
    # Guidance's two halves in two denoiser calls: half the activation memory (denoise.py).
    split_guidance: bool = False
    # The fraction of the steps that are guided (the first ones); the rest run unguided.
    guidance_end: float = 1.0
    # DeepCache: the whole UNet runs on one step in `cache_interval` (1: every step).
    cache_interval: int = 1
    # First Block Cache: a transformer's later blocks are skipped on the steps whose first
    # block changed less than this fraction (0: never).
    cache_threshold: float = 0.0
    # TaylorSeer Lite (diffusion/forecast.py): after `taylorseer_warmup` steps the denoiser
    # runs on one step in `taylorseer_interval` (1: every step) and its output is forecast on
    # the others, to the `taylorseer_order`-th derivative; the last `taylorseer_cooldown`
    # steps run it again.
    taylorseer_interval: int = 1
    taylorseer_warmup: int = 6
    taylorseer_cooldown: int = 2
    taylorseer_order: int = 1
    # One conditioning image per ControlNet, and the scales of their residuals (diffusers'
    # default 1); () without a control image.
    control_images: tuple[Image.Image, ...] = ()
    control_scales: tuple[float, ...] = ()

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images


@dataclass(frozen=True)
class Defaults:
    """A family's defaults for what a call leaves out (diffusers' __call__ defaults)."""

    steps: Mapping[str, int]  # per mode: text, image, inpaint
    guidance: Mapping[str, float]
    guidance_end: float = 1.0  # the build's [generation] guidance_end
    cache_interval: int = 1  # the build's [model] deep_cache (1: off)
    cache_threshold: float = 0.0  # the build's [model] first_block_cache (0: off)
    # the build's [generation] taylorseer_* (OpenVINO GenAI's TaylorSeerCacheConfig defaults)
    taylorseer_interval: int = 1
    taylorseer_warmup: int = 6
    taylorseer_cooldown: int = 2
    taylorseer_order: int = 1  # GenAI's Lite: the first derivative


def parse_request(
    mode: str,
    prompt: Any,
    settings: Mapping[str, Any],
    defaults: Defaults,
    check_size: Callable[[int | None, int | None], tuple[int, int]],
) -> Request:
    """A call's settings checked, with the family's defaults; TypeError on an unknown one."""
    options = dict(settings)
    steps_value = options.pop("steps", None)
    steps = int(defaults.steps[mode] if steps_value is None else steps_value)
    guidance_value = options.pop("guidance", None)
    guidance = float(defaults.guidance[mode] if guidance_value is None else guidance_value)
    num_images = int(options.pop("num_images", 1))
    height, width = check_size(options.pop("height", None), options.pop("width", None))
    prompts = check_prompt(prompt, "prompt")
    negative = options.pop("negative_prompt", None)
    negatives = None
    if negative is not None:
        negatives = check_prompt(negative, "negative_prompt", allow_empty=True)
        if len(negatives) != len(prompts):
            raise InputError(
                f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one "
                "per prompt"
            )
    if not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    if not 1 <= num_images <= MAX_IMAGES:
        raise InputError(f"num_images must be in 1..{MAX_IMAGES} per prompt, got {num_images}")
    if not 0 <= guidance <= MAX_GUIDANCE:  # NaN fails this too
        raise InputError(f"guidance must be a number in 0..{MAX_GUIDANCE}, got {guidance}")
    guidance_end_value = options.pop("guidance_end", None)
    guidance_end = float(
        defaults.guidance_end if guidance_end_value is None else guidance_end_value
    )
    if not 0 < guidance_end <= 1:  # NaN fails this too
        raise InputError(
            f"guidance_end must be the fraction of the steps that are guided, in (0, 1]; got "
            f"{guidance_end}"
        )
    cache_interval = _whole_setting(
        options, "cache_interval", defaults.cache_interval, 1, "1: the whole UNet every step"
    )
    threshold_value = options.pop("cache_threshold", None)
    cache_threshold = float(
        defaults.cache_threshold if threshold_value is None else threshold_value
    )
    if not 0.0 <= cache_threshold <= 1.0:  # NaN fails this too
        raise InputError(
            f"cache_threshold must be the relative change of the first block's output under "
            f"which a step reuses the later blocks, in 0..1 (0: never); got {cache_threshold}"
        )
    taylorseer = (
        _whole_setting(
            options,
            "taylorseer_interval",
            defaults.taylorseer_interval,
            1,
            "1: the denoiser every step",
        ),
        _whole_setting(
            options, "taylorseer_warmup", defaults.taylorseer_warmup, 0, "the first steps run"
        ),
        _whole_setting(
            options, "taylorseer_cooldown", defaults.taylorseer_cooldown, 0, "the last steps run"
        ),
    )
    order = _whole_setting(
        options,
        "taylorseer_order",
        defaults.taylorseer_order,
        1,
        "the forecast's highest derivative",
        high=MAX_TAYLORSEER_ORDER,
    )
    if taylorseer[0] > 1 and (cache_interval > 1 or cache_threshold > 0):
        raise InputError(
            "taylorseer_interval forecasts the whole denoiser's output, and cache_interval "
            "or cache_threshold reuse part of it: use one step cache, with cache_interval 1 "
            "and cache_threshold 0 beside taylorseer_interval"
        )
    strength = float(options.pop("strength", 1.0))
    if not 0.0 < strength <= 1.0:  # NaN fails this too
        raise InputError(f"strength must be in (0, 1], got {strength}")
    image = options.pop("image", None)
    mask = options.pop("mask", None)
    control_images, control_scales = _control(
        options.pop("control_image", None), options.pop("control_scale", 1.0)
    )
    request = Request(
        mode=mode,
        prompts=prompts,
        negatives=negatives,
        steps=steps,
        guidance=guidance,
        seed=int(options.pop("seed", 0)),
        num_images=num_images,
        height=height,
        width=width,
        strength=strength,
        scheduler=options.pop("scheduler", None),
        image=None if image is None else load_image(image),
        mask=None if mask is None else load_image(mask),
        latents=options.pop("latents", None),
        callback=options.pop("callback", None),
        progress=options.pop("progress", None) or NullProgress(),
        split_guidance=bool(options.pop("split_guidance", False)),
        guidance_end=guidance_end,
        cache_interval=cache_interval,
        cache_threshold=cache_threshold,
        taylorseer_interval=taylorseer[0],
        taylorseer_warmup=taylorseer[1],
        taylorseer_cooldown=taylorseer[2],
        taylorseer_order=order,
        control_images=control_images,
        control_scales=control_scales,
    )
    if options:
        raise TypeError(f"unknown generation setting(s): {', '.join(sorted(options))}")
    return request


def _whole_setting(
    options: dict[str, Any],
    name: str,
    default: int,
    low: int,
    meaning: str,
    high: int = MAX_STEPS,
) -> int:
    """A whole number (of steps, unless `high` says otherwise) in low..high, popped from
    `options` (else `default`)."""
    value = options.pop(name, None)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise InputError(f"{name} must be in {low}..{high} ({meaning}), got {value}")
    return int(value)


def _control(images: Any, scales: Any) -> tuple[tuple[Any, ...], tuple[float, ...]]:
    """Control images (one, or a list: one per ControlNet) and their scales (one for all,
    or one each), as diffusers' ControlNet pipelines take them."""
    if images is None:
        return (), ()
    listed = list(images) if isinstance(images, list | tuple) else [images]
    values = [float(s) for s in scales] if isinstance(scales, list | tuple) else [float(scales)]
    if len(values) == 1:
        values *= len(listed)
    if len(values) != len(listed):
        raise InputError(
            f"got {len(values)} control scales for {len(listed)} control images; give one "
            "scale, or one per image"
        )
    for value in values:
        if not 0.0 <= value <= MAX_CONTROL_SCALE:  # NaN fails this too
            raise InputError(f"control_scale must be in 0..{MAX_CONTROL_SCALE}, got {value}")
    return tuple(load_image(image) for image in listed), tuple(values)


def check_prompt(prompt: Any, name: str, *, allow_empty: bool = False) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list | tuple) or not prompts:
        raise InputError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    for item in prompts:
        if not isinstance(item, str):
            raise InputError(f"{name} must be text, got {type(item).__name__} {item!r}")
        if not allow_empty and not item.strip():
            raise InputError(f"{name} is empty; describe the image to generate")
    return list(prompts)


def check_latents(request: Request, expected: tuple[int, ...]) -> None:
    if request.mode == "image":
        raise InputError("latents= applies to text_to_image and inpaint, not image_to_image")
    latents = request.latents
    if not isinstance(latents, np.ndarray) or latents.shape != expected:
        shape = getattr(latents, "shape", type(latents).__name__)
        raise InputError(
            f"latents must be a float32 array of shape {expected} (prompts × images, latent "
            f"channels, latent height, latent width), got {shape}"
        )


__all__ = ["MAX_GUIDANCE", "Defaults", "Request", "check_latents", "check_prompt", "parse_request"]
