"""DeepCache (Ma et al., 2023) for SD's and SDXL's UNets: the torch side.

Adjacent denoising steps change a UNet's deep features little. With `[model] deep_cache = N`
the UNet's wrapper also outputs `deep_features`, the output of its last up block's first
layer (stable_diffusion_modules.UNet), and a second component, `unet_shallow`, computes a
step from the same inputs plus those features: the time embedding, conv_in, the first down
block's layers but its last, the last up block's layers but its first, and the output
convolution (DeepCache's shallowest branch, its default), on the steps between those where
the whole UNet runs (one in N; diffusion/denoise.py decides which). The wrappers keep the
UNet as `self.model`, so weights keep their checkpoint names and the ONNX export streams
them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelkiln.diffusion.denoise import SHALLOW_UNET


class ShallowUNet(nn.Module):
    """sample, timestep, encoder_hidden_states, deep_features -> out_sample: the UNet's
    forward (diffusers' UNet2DConditionModel) through its shallowest layers only, the kept
    features standing in for everything between them."""

    model: Any  # diffusers UNet2DConditionModel

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        deep_features: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        return (self._shallow(sample, timestep, encoder_hidden_states, {}, deep_features),)

    def _shallow(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        conditions: dict[str, torch.Tensor],
        deep_features: torch.Tensor,
    ) -> torch.Tensor:
        unet = self.model
        embedding = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep))
        added = unet.get_aug_embed(
            emb=embedding, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=conditions
        )
        if added is not None:
            embedding = embedding + added
        if unet.time_embed_act is not None:
            embedding = unet.time_embed_act(embedding)
        sample = unet.conv_in(sample)
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        # diffusers' up blocks have one layer more than the down blocks (L): the last up
        # block's layer k >= 1 takes the skip of the first down block's layer L - 1 - k, or
        # conv_in's output for k = L. So the first L - 1 down layers run, then up layers
        # 1..L on the kept output of up layer 0 (DeepCache's shallowest branch).
        layers = len(last.resnets) - 1
        skips, hidden = [sample], sample
        for index in range(layers - 1):
            hidden = _layer(first, index, hidden, embedding, encoder_hidden_states)
            skips.append(hidden)
        out = deep_features
        for index in range(1, layers + 1):
            out = torch.cat([out, skips[layers - index]], dim=1)
            out = _layer(last, index, out, embedding, encoder_hidden_states)
        if unet.conv_norm_out is not None:
            out = unet.conv_act(unet.conv_norm_out(out))
        return unet.conv_out(out)


class ShallowUNetXL(ShallowUNet):
    """SDXL's: also the pooled text_embeds and the six time_ids."""

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        deep_features: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        conditions = {"text_embeds": text_embeds, "time_ids": time_ids}
        return (self._shallow(sample, timestep, encoder_hidden_states, conditions, deep_features),)


def _layer(
    block: Any, index: int, hidden: torch.Tensor, embedding: torch.Tensor, text: torch.Tensor
) -> torch.Tensor:
    """Layer `index` of a diffusers down or up block: its resnet, then its transformer
    where the block has them (what the block's own forward does per layer)."""
    hidden = block.resnets[index](hidden, embedding)
    attentions = getattr(block, "attentions", None)
    if attentions is not None:
        hidden = attentions[index](hidden, encoder_hidden_states=text, return_dict=False)[0]
    return hidden


def shallow_unet(model: Any, xl: bool) -> ShallowUNet:
    """`model` (a UNet of its own) as the shallow UNet, its deep blocks let go: the
    reference pipeline holds this beside the whole UNet."""
    for index in range(1, len(model.down_blocks)):
        model.down_blocks[index] = nn.Identity()
    for index in range(len(model.up_blocks) - 1):
        model.up_blocks[index] = nn.Identity()
    model.mid_block = None
    return ShallowUNetXL(model) if xl else ShallowUNet(model)


__all__ = [
    "SHALLOW_UNET",
    "ShallowUNet",
    "ShallowUNetXL",
    "shallow_unet",
]
