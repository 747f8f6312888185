"""Stable Diffusion 3 / 3.5 (family "sd3") and Flux.1 (family "flux"): diffusers pipelines whose
denoiser is a transformer (MMDiT) trained for flow matching, conditioned by CLIP and T5.

Components and IO follow optimum's exports of the same pipelines: SD3 has text_encoder and
text_encoder_2 (CLIP-L and CLIP-G, with projection), text_encoder_3 (T5, optional: diffusers
runs without it), transformer (hidden_states, timestep, encoder_hidden_states,
pooled_projections -> out_hidden_states), vae_encoder, vae_decoder; Flux has text_encoder
(CLIP-L, pooled), text_encoder_2 (T5), transformer (packed latents, positions and, for the
guidance-distilled dev, the guidance scale) and the VAE halves.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.diffusion.block_cache import (
    FIRST_BLOCK_RESIDUAL,
    TAIL_BLOCKS_RESIDUAL,
    TRANSFORMER_HEAD,
)
from modelkiln.errors import ProfileError
from modelkiln.models.stable_diffusion import (
    TEXT_TO_IMAGE,
    StableDiffusionFamily,
)
from modelkiln.models.step_caches import FORECAST_KNOB, check_block_cache
from modelkiln.specs import TensorSpec

if TYPE_CHECKING:
    from modelkiln.profiles import Profile

# Flow-matching timesteps: SD3's transformer takes 1000 * sigma, Flux's sigma itself.
SD3_TIMESTEPS = (0.0, 1000.0)
FLUX_TIMESTEPS = (0.0, 1.0)
# Flux's positions of image tokens run over the latent grid; its text tokens all sit at 0.
POSITIONS = (0.0, 64.0)
GUIDANCE = (1.0, 10.0)  # the distilled guidance scales users pass (dev: 3.5 by default)
IDS_COLUMNS = 3  # Flux's rotary positions: (unused, row, column)


class StableDiffusion3Family(StableDiffusionFamily):
    name: ClassVar[str] = "sd3"
    summary: ClassVar[str] = (
        "diffusers StableDiffusion3Pipeline / Img2Img / Inpaint directories (SD 3, 3.5 Medium "
        "and Large; T5 optional)"
    )
    pipelines: ClassVar[Mapping[str, str]] = {
        "stable-diffusion-3": "modelkiln.pipelines.flow_diffusion:SD3Pipeline"
    }
    denoiser: ClassVar[str] = "transformer"
    runtime_lora: ClassVar[bool] = False  # LoRA slots are built into UNets only
    caches_steps: ClassVar[bool] = False  # DeepCache splits UNets only
    caches_blocks: ClassVar[bool] = True  # First Block Cache splits transformers
    merges_unet_tokens: ClassVar[bool] = False  # ToMe for SD hooks UNet blocks
    # Guidance on the first half of the steps only; the later blocks skipped on the steps
    # whose first block moved less than 10 % (ParaAttention's range for Flux: 0.08-0.12);
    # the transformer on one step in 3, its output forecast between (TaylorSeer).
    tuning_knobs: ClassVar[tuple[str | tuple[str, ...], ...]] = (
        "generation.guidance_end=0.5",
        "model.first_block_cache=0.1",
        FORECAST_KNOB,
    )
    tokenizer_folders: ClassVar[Mapping[str, str]] = {
        "text_encoder": "tokenizer",
        "text_encoder_2": "tokenizer_2",
        "text_encoder_3": "tokenizer_3",
    }
    required_folders: ClassVar[tuple[str, ...]] = (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    # diffusers' default_sample_size: 128 latents (1024 pixels with SD3's VAE).
    default_sample_size: ClassVar[int] = 128
    schedulers: ClassVar[tuple[str, ...]] = ("flow-match-euler",)
    t5_encoder: ClassVar[str] = "text_encoder_3"
    t5_sequence_length: ClassVar[int] = 256
    # A transformer that reads the mask and the kept image (16 + 1 + 16 channels).
    inpainting_channels: ClassVar[int] = 33
    bundle_configs: ClassVar[tuple[str, ...]] = (
        "model_index.json",
        "scheduler/",
        "tokenizer/",
        "tokenizer_2/",
        "tokenizer_3/",
    )

    @classmethod
    def _model_info(
        cls,
        root: Path,
        index: Mapping[str, Any],
        denoiser_config: Mapping[str, Any],
        sequences: Mapping[str, int],
    ) -> dict[str, Any]:
        return {
            "transformer_in_channels": denoiser_config["in_channels"],
            "patch_size": denoiser_config.get("patch_size", 2),
            "joint_attention_dim": denoiser_config["joint_attention_dim"],
            "t5_sequence_length": sequences[cls.t5_encoder],
            "has_t5": (root / cls.t5_encoder).is_dir(),
        }

    @classmethod
    def _check_step_cache(
        cls, root: Path, denoiser_config: Mapping[str, Any], profile: Profile
    ) -> None:
        super()._check_step_cache(root, denoiser_config, profile)
        if profile.model.first_block_cache:
            check_block_cache(root, denoiser_config)

    @classmethod
    def _step_cache_components(cls, profile: Profile) -> list[tuple[str, str]]:
        """First Block Cache's head, from the transformer's folder."""
        return [(TRANSFORMER_HEAD, cls.denoiser)] if profile.model.first_block_cache else []

    @classmethod
    def _step_cache_signature(
        cls,
        name: str,
        config: Mapping[str, Any],
        inputs: dict[str, TensorSpec],
        outputs: dict[str, TensorSpec],
        profile: Profile,
    ) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        """First Block Cache (models/first_block_cache.py): the transformer also outputs both
        residuals; its head takes the tail residual and outputs the first block's."""
        if not profile.model.first_block_cache or name not in (cls.denoiser, TRANSFORMER_HEAD):
            return inputs, outputs
        residual = cls._residual_spec(config)
        first = {FIRST_BLOCK_RESIDUAL: residual}
        if name == cls.denoiser:
            return inputs, {**outputs, **first, TAIL_BLOCKS_RESIDUAL: residual}
        return {**inputs, TAIL_BLOCKS_RESIDUAL: residual}, {**outputs, **first}

    @classmethod
    def _residual_spec(cls, config: Mapping[str, Any]) -> TensorSpec:
        """The image tokens' residuals in the latents' layout: each patch's features spread
        over its latent pixels (models/first_block_cache.to_latent_layout)."""
        width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        patch = int(config.get("patch_size", 2))
        latent = ("latent_height", "latent_width")
        return TensorSpec("float32", ("batch", width // (patch * patch), *latent))

    @classmethod
    def _signature(
        cls,
        name: str,
        config: Mapping[str, Any],
        sequences: Mapping[str, int],
        dims: Mapping[str, int],
    ) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        if name not in (cls.denoiser, TRANSFORMER_HEAD):
            return super()._signature(name, config, sequences, dims)
        latent = ("latent_height", "latent_width")
        tokens = sequences["text_encoder"] + sequences[cls.t5_encoder]  # CLIP's, then T5's
        inputs = {
            "hidden_states": TensorSpec("float32", ("batch", config["in_channels"], *latent)),
            "timestep": TensorSpec("float32", ("batch",), value_range=SD3_TIMESTEPS),
            "encoder_hidden_states": TensorSpec(
                "float32", ("batch", tokens, config["joint_attention_dim"])
            ),
            "pooled_projections": TensorSpec("float32", ("batch", config["pooled_projection_dim"])),
        }
        out = TensorSpec("float32", ("batch", config["out_channels"], *latent))
        return inputs, {"out_hidden_states": out}


class FluxFamily(StableDiffusion3Family):
    name: ClassVar[str] = "flux"
    summary: ClassVar[str] = "diffusers FluxPipeline / Img2Img directories (Flux.1 dev and schnell)"
    tasks: ClassVar[tuple[str, ...]] = (TEXT_TO_IMAGE,)  # Flux Fill is not supported
    pipelines: ClassVar[Mapping[str, str]] = {
        "flux": "modelkiln.pipelines.flow_diffusion:FluxPipeline"
    }
    tokenizer_folders: ClassVar[Mapping[str, str]] = {
        "text_encoder": "tokenizer",
        "text_encoder_2": "tokenizer_2",
    }
    required_folders: ClassVar[tuple[str, ...]] = (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    )
    t5_encoder: ClassVar[str] = "text_encoder_2"
    t5_sequence_length: ClassVar[int] = 512  # FluxPipeline's max_sequence_length
    # Flux runs without classifier-free guidance: one transformer call per image.
    denoiser_batch_factor: ClassVar[int] = 1
    # Guidance-distilled: no guidance batch to drop; the later blocks skipped and the output
    # forecast as for SD3.
    tuning_knobs: ClassVar[tuple[str | tuple[str, ...], ...]] = (
        "model.first_block_cache=0.1",
        FORECAST_KNOB,
    )
    inpainting_channels: ClassVar[int] = 0  # Flux Fill (384 channels) is not supported
    bundle_configs: ClassVar[tuple[str, ...]] = (
        "model_index.json",
        "scheduler/",
        "tokenizer/",
        "tokenizer_2/",
    )
    usage: ClassVar[Mapping[str, str]] = {
        TEXT_TO_IMAGE: 'kiln generate {bundle} --prompt "a lighthouse at dusk" -o image.png',
    }

    @classmethod
    def _dims(
        cls, height: int, width: int, factor: int, denoiser_config: Mapping[str, Any]
    ) -> dict[str, int]:
        """Flux packs 2×2 latent patches into one token: the image must be a multiple of
        twice the VAE's factor (diffusers rounds it down; the profile check says so)."""
        dims = super()._dims(height, width, factor, denoiser_config)
        for key in ("height", "width"):
            if dims[key] % (2 * factor):
                raise ProfileError(
                    f"shapes.{key} = {dims[key]} is not a multiple of {2 * factor}: Flux packs "
                    f"2×2 latents of this VAE's {factor}×{factor} pixels into one token"
                )
        dims["image_tokens"] = (dims["latent_height"] // 2) * (dims["latent_width"] // 2)
        return dims

    @classmethod
    def _residual_spec(cls, config: Mapping[str, Any]) -> TensorSpec:
        """The image tokens' residuals as the tokens travel: packed, one per 2×2 latents."""
        width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        return TensorSpec("float32", ("batch", "image_tokens", width))

    @classmethod
    def _model_info(
        cls,
        root: Path,
        index: Mapping[str, Any],
        denoiser_config: Mapping[str, Any],
        sequences: Mapping[str, int],
    ) -> dict[str, Any]:
        info = super()._model_info(root, index, denoiser_config, sequences)
        return {**info, "guidance_embeds": bool(denoiser_config.get("guidance_embeds", False))}

    @classmethod
    def _signature(
        cls,
        name: str,
        config: Mapping[str, Any],
        sequences: Mapping[str, int],
        dims: Mapping[str, int],
    ) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        if name not in (cls.denoiser, TRANSFORMER_HEAD):
            return super()._signature(name, config, sequences, dims)
        text = sequences[cls.t5_encoder]
        channels = config["in_channels"]
        inputs = {
            "hidden_states": TensorSpec("float32", ("batch", "image_tokens", channels)),
            "encoder_hidden_states": TensorSpec(
                "float32", ("batch", text, config["joint_attention_dim"])
            ),
            "pooled_projections": TensorSpec("float32", ("batch", config["pooled_projection_dim"])),
            "timestep": TensorSpec("float32", ("batch",), value_range=FLUX_TIMESTEPS),
            "img_ids": TensorSpec("float32", ("image_tokens", IDS_COLUMNS), value_range=POSITIONS),
            "txt_ids": TensorSpec("float32", (text, IDS_COLUMNS), value_range=(0.0, 1.0)),
        }
        if config.get("guidance_embeds"):
            inputs["guidance"] = TensorSpec("float32", ("batch",), value_range=GUIDANCE)
        out_channels = config.get("out_channels") or channels
        out = TensorSpec("float32", ("batch", "image_tokens", out_channels))
        return inputs, {"out_hidden_states": out}


__all__ = ["FluxFamily", "StableDiffusion3Family"]
