"""Which denoisers the step caches can split: DeepCache's UNets ([model] deep_cache) and
First Block Cache's transformers ([model] first_block_cache). Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelkiln.diffusion.control import CONTROLNET
from modelkiln.errors import UnsupportedError


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


__all__ = ["check_block_cache", "check_deep_cache"]
