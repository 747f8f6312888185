"""Which denoisers the step caches can split: DeepCache's UNets ([model] deep_cache) and
First Block Cache's transformers ([model] first_block_cache); and which UNets ToMe for SD
merges the tokens of ([model] token_merging_ratio); the TaylorSeer knob `kiln tune` tries on
every denoiser. Torch-free."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelkiln.diffusion.control import CONTROLNET
from modelkiln.errors import UnsupportedError

# `kiln tune`'s TaylorSeer candidate (any denoiser): the denoiser on one step in 3 after two
# warm-up steps, and on the last; its output forecast on the others.
FORECAST_KNOB = (
    "generation.taylorseer_interval=3",
    "generation.taylorseer_warmup=2",
    "generation.taylorseer_cooldown=1",
)


def check_deep_cache(root: Path, unet_config: Mapping[str, Any]) -> None:
    """A UNet DeepCache can split: SD's or SDXL's conditioning, more than one block, no
    ControlNet (whose residuals the shallow UNet would also need)."""
    where = f"{root}: model.deep_cache"
    if (root / CONTROLNET).is_dir():
        raise UnsupportedError(
            f"{where} is not built for ControlNet pipelines (the shallow UNet takes no "
            "residuals); build without it"
        )
    if len(unet_config.get("block_out_channels", ())) < 2:
        raise UnsupportedError(f"{where}: a UNet of one block has no deep features to reuse")
    if not isinstance(unet_config.get("layers_per_block", 2), int):
        raise UnsupportedError(
            f"{where}: the shallow UNet is built for one layers_per_block for every block, not "
            f"{unet_config['layers_per_block']}; build without model.deep_cache"
        )
    keys = ("class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim")
    named = [f"{key} = {unet_config[key]}" for key in keys if unet_config.get(key) is not None]
    if unet_config.get("addition_embed_type") not in (None, "text_time"):
        named.append(f"addition_embed_type = {unet_config['addition_embed_type']}")
    if named:
        raise UnsupportedError(
            f"{where}: the shallow UNet is built for SD's and SDXL's conditioning, not "
            f"{', '.join(named)}; build without model.deep_cache"
        )


def check_block_cache(root: Path, transformer_config: Mapping[str, Any]) -> None:
    """A transformer First Block Cache can split: a first joint block and one more after it
    (SD3's blocks, Flux's joint then single-stream blocks)."""
    joint = int(transformer_config.get("num_layers", 0))
    blocks = joint + int(transformer_config.get("num_single_layers", 0))
    if joint < 1 or blocks < 2:
        raise UnsupportedError(
            f"{root}: model.first_block_cache needs a transformer of two blocks or more, the "
            f"first a joint one (this one has {joint} joint of {blocks}); build without it"
        )


# TensorRT's TopK layer takes k <= 3840; the matching ranks every source token with one.
TENSORRT_MAX_TOPK = 3840


def check_token_merging(
    root: Path, unet_config: Mapping[str, Any], latent_size: tuple[int, int], format: str
) -> None:
    """A UNet ToMe for SD can merge in (models/unet_token_merging.py): one with attention in
    a down block, whose source tokens there (3 of every 2x2 window) TensorRT can rank."""
    kinds = list(unet_config.get("down_block_types", ()))
    attending = [index for index, kind in enumerate(kinds) if "CrossAttn" in kind]
    if not attending:
        raise UnsupportedError(
            f"{root}: model.token_merging_ratio merges self-attention tokens and this UNet's "
            "down blocks have no attention; build without it"
        )
    downsample = 2 ** attending[0]
    height, width = (math.ceil(side / downsample) for side in latent_size)
    sources = height * width - (height // 2) * (width // 2)
    if format == "tensorrt" and sources > TENSORRT_MAX_TOPK:
        raise UnsupportedError(
            f"{root}: model.token_merging_ratio ranks the {sources} source tokens of a "
            f"{height}x{width} grid, and TensorRT's TopK takes at most {TENSORRT_MAX_TOPK}; "
            "build a smaller shapes.height/width or without it"
        )


__all__ = ["check_block_cache", "check_deep_cache", "check_token_merging"]
