"""Tiny SD and SDXL pipelines (and an SD-1.5-sized one for benchmarks) with random weights,
saved in the diffusers layout, with a tiny CLIP tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for bytes (GPT-2's table)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def write_tiny_clip_tokenizer(
    directory: str | Path, *, pad_token: str = "<|endoftext|>", model_max_length: int = 77
) -> Path:
    """A 525-token CLIP BPE tokenizer: every byte (plain and word-final) plus a few merges."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_level_alphabet()
    merges = [
        ("p", "h"),
        ("ph", "o"),
        ("pho", "t"),
        ("phot", "o</w>"),
        ("o", "f</w>"),
        ("c", "a"),
        ("ca", "t</w>"),
        ("d", "o"),
        ("do", "g</w>"),
        ("t", "h"),
        ("th", "e</w>"),
    ]
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(directory)
    return directory


def _tiny_clip_config(
    projection_dim: int = 32, *, hidden_size: int = 32, hidden_act: str = "quick_gelu"
) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=523,  # <|startoftext|> in the tiny vocabulary
        eos_token_id=524,
        pad_token_id=524,
        hidden_act=hidden_act,
    )


def _tiny_vae(**overrides: Any) -> Any:
    """SD's 4-channel VAE, 2 blocks (images are 2x the latents); overrides change its config."""
    from diffusers import AutoencoderKL

    config: dict[str, Any] = dict(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=16,
        norm_num_groups=32,
        scaling_factor=0.18215,
    )
    return AutoencoderKL(**(config | overrides))


def tiny_unet(*, in_channels: int = 4, xl_layout: bool = False) -> Any:
    """tiny_sd's UNet: 2 blocks on 16x16 latents, attention in the first down block (SD's
    layout) or, with `xl_layout`, only in the second (SDXL's: none at the latent's own
    resolution)."""
    from diffusers import UNet2DConditionModel

    down = ("CrossAttnDownBlock2D", "DownBlock2D")
    up = ("UpBlock2D", "CrossAttnUpBlock2D")
    return UNet2DConditionModel(
        sample_size=16,  # latents; the VAE halves twice -> 32x32 images
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=down[::-1] if xl_layout else down,
        up_block_types=up[::-1] if xl_layout else up,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _sd_scheduler(prediction_type: str = "epsilon") -> Any:
    """SD 1.x's PNDM scheduler config (v_prediction: SD 2.x style)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
        num_train_timesteps=1000,
        prediction_type=prediction_type,
    )


def tiny_sd(
    directory: str | Path,
    *,
    inpaint: bool = False,
    seed: int = 0,
    prediction_type: str = "epsilon",
    text_hidden_act: str = "quick_gelu",
    controlnet: int = 0,
) -> Path:
    """A diffusers StableDiffusion(Inpaint)Pipeline directory: 2-block UNet, 32x32 images.
    prediction_type="v_prediction" makes it an SD 2.x-style v-prediction model, and
    text_hidden_act="gelu" gives it SD 2.x's kind of text encoder (OpenCLIP's, as single files
    store it); controlnet=N makes it a StableDiffusionControlNetPipeline with N ControlNets
    (a MultiControlNetModel when N > 1)."""
    import torch
    from diffusers import (
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    unet = tiny_unet(in_channels=9 if inpaint else 4)
    scheduler = _sd_scheduler(prediction_type)
    tokenizer_dir = write_tiny_clip_tokenizer(directory / "_tokenizer")
    pipeline_class: Any = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    extra: dict[str, Any] = {}
    if controlnet:
        from diffusers import StableDiffusionControlNetPipeline

        pipeline_class = StableDiffusionControlNetPipeline
        nets = [_tiny_controlnet(unet) for _ in range(controlnet)]
        extra["controlnet"] = nets[0] if controlnet == 1 else nets
    pipeline = pipeline_class(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_tiny_clip_config(hidden_act=text_hidden_act)),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **extra,
    )
    pipeline.save_pretrained(directory)
    shutil.rmtree(tokenizer_dir)
    return directory


def _tiny_controlnet(unet: Any) -> Any:
    """A ControlNet of the UNet's shape. from_unet zero-initialises its output convolutions
    (a fresh ControlNet adds nothing): random ones, so that tests see what it adds."""
    import torch
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        zeroed = [*net.controlnet_down_blocks, net.controlnet_mid_block]
        for conv in [*zeroed, net.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0.0, 0.05)
            conv.bias.normal_(0.0, 0.05)
    return net


def tiny_sdxl(
    directory: str | Path,
    *,
    inpaint: bool = False,
    seed: int = 0,
    text_encoder_2_width: int = 32,
    controlnet: int = 0,
) -> Path:
    """A diffusers StableDiffusionXL(Inpaint)Pipeline directory with two tiny text encoders.
    A single file tells its two encoders apart by width (as diffusers reads it): such a
    fixture needs text_encoder_2_width != 32. controlnet=1 makes it a
    StableDiffusionXLControlNetPipeline."""
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=9 if inpaint else 4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # both encoders' penultimate hidden states, concatenated
        cross_attention_dim=32 + text_encoder_2_width,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled embeds
        transformer_layers_per_block=(1, 1),
        norm_num_groups=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        num_train_timesteps=1000,
    )
    first = write_tiny_clip_tokenizer(directory / "_tokenizer")
    second = write_tiny_clip_tokenizer(directory / "_tokenizer_2", pad_token="!")
    pipeline_class: Any = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
    extra: dict[str, Any] = {"requires_aesthetics_score": False} if inpaint else {}
    if controlnet:
        from diffusers import StableDiffusionXLControlNetPipeline

        pipeline_class = StableDiffusionXLControlNetPipeline
        extra["controlnet"] = _tiny_controlnet(unet)
    pipeline = pipeline_class(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_tiny_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(
            _tiny_clip_config(hidden_size=text_encoder_2_width)
        ),
        tokenizer=CLIPTokenizer.from_pretrained(first),
        tokenizer_2=CLIPTokenizer.from_pretrained(second),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        **extra,
    )
    pipeline.save_pretrained(directory)
    shutil.rmtree(first)
    shutil.rmtree(second)
    return directory


# --- Flow matching: SD3 and Flux --------------------------------------------------------


# runwayml/stable-diffusion-v1-5's component configs (what the benchmarks build, randomly).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower, with the tiny tokenizer's special tokens.
SD15_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "bos_token_id": 523,
    "eos_token_id": 524,
    "pad_token_id": 524,
}


def random_sd15(directory: str | Path, *, seed: int = 0) -> Path:
    """An SD-1.5-sized StableDiffusionPipeline directory (1.07 B parameters, 4.3 GB fp32) with
    random weights from the real configs and the tiny tokenizer: benchmarks, not tests."""
    import torch
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer_dir = write_tiny_clip_tokenizer(directory / "_tokenizer")
    pipeline: Any = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=UNet2DConditionModel(**SD15_UNET_CONFIG),
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    shutil.rmtree(tokenizer_dir)
    return directory
