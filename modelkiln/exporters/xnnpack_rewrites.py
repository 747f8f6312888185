"""Larger graphs for XNNPACK: what `[executorch] rewrite_for_xnnpack` changes while the
exporter traces.

XnnpackPartitioner delegates only the ops it has kernels for; every op it leaves runs on
ExecuTorch's portable kernels and cuts the delegated graph in two. As exported, a ViT's
LayerNorm, a UNet's GroupNorm, the safe softmax torch's SDPA decomposes into (eq, any,
logical_not, where over the whole score matrix) and every reshape of a dynamic batch (a
symbolic size: "Symbolic reshape is not supported") are such ops: the tiny ViT's two layers
were lowered in 23 subgraphs with 111 portable nodes. Rewritten, the same numbers come from ops
it takes:

- LayerNorm (over the last axis): mean and variance as a Linear against a constant 1/C row,
  so no reshape is needed whatever the batch;
- GroupNorm: the mean over axes 2 and 3 of a (batch, groups, C/groups, H*W) view, the one
  mean XNNPACK has (global average pooling);
- scaled_dot_product_attention: bmm, softmax, bmm on (batch*heads, L, D) views, a boolean
  mask turned into an additive one once.

The model's own reshapes of a dynamic batch stay on the portable kernels: giving their
symbolic size to XNNPACK as -1 (an edge pass) made a whole SD-1.5 UNet 35x slower at batch 2
(290 s a call against 8.2 s without it; ViT-B and single UNet blocks were not slowed), so it
is not done. A static batch (`shapes.dynamic_batch = false`) has none.

The modules are swapped only while the exporter traces (the build's torch reference stays
the model as it was) and the program is validated against that reference like any other.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from functools import wraps
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class DelegableLayerNorm(nn.Module):
    """nn.LayerNorm over the last axis, its statistics as Linear layers (XNNPACK's GEMM)."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        (channels,) = norm.normalized_shape
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        # Not persistent: a constant of the program, not a weight of the checkpoint.
        dtype = torch.float32 if norm.weight is None else norm.weight.dtype
        self.averaging: torch.Tensor
        self.register_buffer(
            "averaging", torch.full((1, channels), 1 / channels, dtype=dtype), False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - F.linear(x, self.averaging)
        variance = F.linear(centred * centred, self.averaging)
        y = centred * torch.rsqrt(variance + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


class DelegableGroupNorm(nn.Module):
    """nn.GroupNorm of a (batch, C, *spatial) input, its statistics as means over XNNPACK's
    pooled axes of a (batch, groups, C/groups, spatial) view."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        self.groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, *spatial = x.shape[1:]
        grouped = x.reshape(-1, self.groups, channels // self.groups, math.prod(spatial))
        centred = grouped - grouped.mean(dim=(2, 3), keepdim=True)
        variance = (centred * centred).mean(dim=(2, 3), keepdim=True)
        y = (centred * torch.rsqrt(variance + self.eps)).view(-1, channels, *spatial)
        per_channel = (channels, *[1] * len(spatial))
        if self.weight is not None:
            y = y * self.weight.view(per_channel)
        if self.bias is not None:
            y = y + self.bias.view(per_channel)
        return y


_SDPA = F.scaled_dot_product_attention


def delegable_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    additive_masks: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """F.scaled_dot_product_attention as bmm, softmax, bmm. A row that masks every key gets
    NaN here where torch's safe softmax gives zeros: no model we export has one.
    `additive_masks`: a boolean mask's additive form by the mask's id, so that the layers
    sharing one mask convert it once."""
    if enable_gqa or dropout_p:
        return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                     enable_gqa=enable_gqa)  # fmt: skip
    *lead, length, depth = query.shape
    keys = key.shape[-2]
    scale = 1.0 / math.sqrt(depth) if scale is None else scale
    scores = torch.bmm(
        (query * scale).reshape(-1, length, depth), key.reshape(-1, keys, depth).transpose(1, 2)
    )
    if is_causal:
        attn_mask = torch.ones(length, keys, dtype=torch.bool).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = _additive(attn_mask, query.dtype, additive_masks)
        scores = (scores.view(*lead, length, keys) + attn_mask).reshape(-1, length, keys)
    mixed = torch.bmm(torch.softmax(scores, dim=-1), value.reshape(-1, keys, value.shape[-1]))
    return mixed.view(*lead, length, value.shape[-1])


def _additive(
    mask: torch.Tensor,
    dtype: torch.dtype,
    known: dict[int, tuple[torch.Tensor, torch.Tensor]] | None,
) -> torch.Tensor:
    if known is not None and id(mask) in known:
        return known[id(mask)][1]
    additive = torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, float("-inf"))
    if known is not None:
        known[id(mask)] = (mask, additive)  # the mask kept alive: its id stays its own
    return additive


def _replacement(child: nn.Module) -> nn.Module | None:
    if isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
        return DelegableLayerNorm(child)
    if isinstance(child, nn.GroupNorm):
        return DelegableGroupNorm(child)
    return None


@contextlib.contextmanager
def delegable(module: Any) -> Iterator[Any]:
    """`module` with its norms swapped and torch's SDPA replaced, while the block runs (the
    exporter's trace, in this thread: a build exports one component at a time); everything
    as it was afterwards."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    if isinstance(module, nn.Module):
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                replacement = _replacement(child)
                if replacement is not None:
                    setattr(parent, name, replacement)
                    swapped.append((parent, name, child))
    masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    previous = F.scaled_dot_product_attention

    @wraps(delegable_attention)  # a function with a name: PT2E's capture reads it
    def attention(*args: Any, **kwargs: Any) -> torch.Tensor:
        return delegable_attention(*args, **kwargs, additive_masks=masks)

    F.scaled_dot_product_attention = attention
    try:
        yield module
    finally:
        F.scaled_dot_product_attention = previous
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
