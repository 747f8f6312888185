"""What a diffusion build adds to a profile: LoRAs fused before export ([[lora]]), slots
for LoRAs chosen at run time ([runtime_lora]) and the defaults its image calls use
([generation])."""

from __future__ import annotations

from dataclasses import dataclass


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
    min_ssim) measures its cost against the fully guided pipeline."""

    scheduler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_end: float | None = None


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
