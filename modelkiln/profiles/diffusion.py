"""What a diffusion build adds to a profile: LoRAs fused before export ([[lora]]), slots
for LoRAs chosen at run time ([runtime_lora]) and the defaults its image calls use
([generation])."""

from __future__ import annotations

from dataclasses import dataclass

from modelkiln.errors import ProfileError
from modelkiln.profiles.model import ModelSettings


@dataclass(frozen=True)
class GenerationSettings:
    """[generation]: what an image call of a diffusion artifact uses when it leaves it out.
    `scheduler` (a `kiln generate --scheduler` name) is written into the artifact's scheduler
    config, so optimum and OpenVINO GenAI run it too; steps and guidance become the pipeline's
    defaults. Few-step models: LCM (scheduler "lcm", 4 steps, guidance 1.0), SD/SDXL-Turbo
    (1 to 4 steps, guidance 0).

    `guidance_end` trades quality for speed: only the first ceil(guidance_end × steps) steps
    are guided, the rest run the denoiser on the prompt's half alone (half the batch; the
    "dynamic classifier-free guidance" of diffusers' docs). It is an approximation the torch
    reference never makes, so the build's end-to-end gate ([validation] min_psnr_db /
    min_ssim) measures its cost against the fully guided pipeline.

    `taylorseer_interval` (TaylorSeer Lite, as OpenVINO GenAI's TaylorSeerCacheConfig; any
    denoiser, no rebuild needed): after `taylorseer_warmup` steps the denoiser runs on one
    step in the interval and its output is forecast on the others from the last computed
    ones (a Taylor series to the `taylorseer_order`-th derivative: 1 is GenAI's Lite, more
    is diffusers' max_order); the last `taylorseer_cooldown` steps run it again. Gated end
    to end like guidance_end."""

    scheduler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_end: float | None = None
    taylorseer_interval: int | None = None
    taylorseer_warmup: int | None = None
    taylorseer_cooldown: int | None = None
    taylorseer_order: int | None = None

    def check(self, origin: str, model: ModelSettings) -> None:
        """What the range checks of Profile do not say (they bound every whole number)."""
        end = self.guidance_end
        if end is not None and not 0.0 < end <= 1.0:  # NaN fails this too
            raise ProfileError(
                f"{origin}: generation.guidance_end must be a fraction of the steps in (0, 1], "
                f"got {end}"
            )
        if (self.taylorseer_interval or 1) > 1 and (model.deep_cache or model.first_block_cache):
            raise ProfileError(
                f"{origin}: generation.taylorseer_interval forecasts the whole denoiser's "
                "output, and model.deep_cache / model.first_block_cache reuse part of it: "
                "keep one step cache"
            )


@dataclass(frozen=True)
class LoraSettings:
    """[[lora]]: a LoRA fused into the model before export (diffusers, kohya/A1111 or peft
    layout); several apply in order. A relative path in a profile file is relative to it."""

    path: str
    scale: float = 1.0


# The UNet layers diffusers' LoRA training scripts adapt: the attention projections.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class RuntimeLoraSettings:
    """[runtime_lora]: the UNet exported unfused, each target layer taking a LoRA's A and B
    as optional inputs (zeros: no LoRA), so that `kiln generate --lora` switches LoRAs and
    scales without a rebuild (ONNX Runtime runs them as LoRA adapters). `targets` are layer
    names or their last parts ("to_q" adapts every attention's query projection); a LoRA
    that adapts a layer outside them is refused when it is applied."""

    enabled: bool = False
    targets: tuple[str, ...] = ATTENTION_PROJECTIONS
