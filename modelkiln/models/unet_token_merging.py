"""Token merging for SD's and SDXL's UNets (ToMe for SD: Bolya and Hoffman, "Token Merging for
Fast Stable Diffusion", 2023; tomesd's defaults): the torch side of `[model]
token_merging_ratio`.

In every transformer block at the UNet's highest resolution that has attention (SD 1.x/2.x:
the latent's own, 4096 tokens at 512x512; SDXL: half the latent's, 4096 tokens at 1024x1024),
the self-attention runs on fewer tokens: before it, `ratio` of the block's tokens are
averaged into their most similar neighbours; after it, each merged token's output is copied
back to every position it holds.
Cross-attention and the feed-forward stay whole (tomesd's merge_attn only).

The matching is tomesd's bipartite soft matching with use_rand off: the top-left token of
each 2x2 window of the token grid is a destination, the others are sources; each source picks
its most similar destination (cosine of the block's input tokens), and the `ratio * tokens`
best-matched sources are averaged into theirs. Export-friendly, unlike tomesd's own code:
no argsort (ExecuTorch has no sort kernel: topk of every score is the descending order), no
scatter_reduce "mean" (ONNX has no such reduction: sums and counts by scatter_add), and
unmerging is one gather. tests/models/test_unet_token_merging.py pins the result to tomesd's.
The source order differs from tomesd's; attention does not depend on the tokens' order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from modelkiln.errors import UnsupportedError

# tomesd's strides: one destination per 2x2 window of tokens.
STRIDE = 2


def partition(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(destinations, sources): the positions of a height x width token grid, row-major;
    one destination per full 2x2 window (its top-left token), every other token a source."""
    grid = torch.arange(height * width).reshape(height, width)
    rows, cols = height // STRIDE * STRIDE, width // STRIDE * STRIDE
    destinations = grid[:rows:STRIDE, :cols:STRIDE].flatten()
    sources = torch.cat(
        [
            grid[:rows:STRIDE, 1:cols:STRIDE].flatten(),
            grid[1:rows:STRIDE, :cols:STRIDE].flatten(),
            grid[1:rows:STRIDE, 1:cols:STRIDE].flatten(),
            grid[rows:, :].flatten(),  # a row or column left over by an odd size
            grid[:rows, cols:].flatten(),
        ]
    )
    return destinations, sources


class Merge:
    """The merge and unmerge of one block's tokens, matched on `metric` (B, N, C) laid out on
    a height x width grid, `r` sources merged away."""

    def __init__(self, metric: torch.Tensor, height: int, width: int, r: int) -> None:
        destinations, sources = (i.to(metric.device) for i in partition(height, width))
        self.destinations, self.sources = destinations, sources
        self.r = r = min(r, sources.numel())
        with torch.no_grad():
            unit = metric / metric.norm(dim=-1, keepdim=True)
            scores = unit[:, sources] @ unit[:, destinations].transpose(-1, -2)
            best, partner = scores.max(dim=-1)
            order = best.topk(best.shape[-1], dim=-1).indices
        # (B, S - r) sources kept, (B, r) sources merged and the destination each joins
        self.kept, self.moved = order[:, r:], order[:, :r]
        self.into = partner.gather(1, self.moved)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): the kept sources, then the destinations, each the mean
        of itself and the sources merged into it."""
        width = x.shape[-1]
        sources, destinations = x[:, self.sources], x[:, self.destinations]
        kept = sources.gather(1, self.kept[..., None].expand(-1, -1, width))
        moved = sources.gather(1, self.moved[..., None].expand(-1, -1, width))
        # Summed in fp32: half precision would round the sums (as models/token_merging.py)
        into = self.into[..., None]
        summed = destinations.float().scatter_add(1, into.expand(-1, -1, width), moved.float())
        counts = torch.ones_like(destinations[..., :1], dtype=torch.float32).scatter_add(
            1, into, torch.ones_like(moved[..., :1], dtype=torch.float32)
        )
        return torch.cat([kept, (summed / counts).to(x.dtype)], 1)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): every position takes the row of the merged token that
        holds it (a kept source its own, a destination and its merged sources theirs)."""
        batch, count = x.shape[0], self.sources.numel() + self.destinations.numel()
        n_kept = self.kept.shape[1]
        positions = torch.cat(
            [
                self.sources[self.kept],
                self.sources[self.moved],
                self.destinations.expand(batch, -1),
            ],
            1,
        )
        first_destination = n_kept
        rows = torch.cat(
            [
                torch.arange(n_kept, device=x.device).expand(batch, -1),
                self.into + first_destination,
                torch.arange(self.destinations.numel(), device=x.device).expand(batch, -1)
                + first_destination,
            ],
            1,
        )
        # positions is a permutation of every position: the sum writes each row once
        take = torch.zeros(batch, count, dtype=rows.dtype, device=x.device)
        take = take.scatter_add(1, positions, rows)
        return x.gather(1, take[..., None].expand(-1, -1, x.shape[-1]))


class UNetTokenMerging:
    """Hooks on a diffusers UNet (2D condition, SD or SDXL) that merge `ratio` of the tokens
    of its highest-resolution self-attention, as long as the hooks live."""

    def __init__(self, unet: nn.Module, ratio: float) -> None:
        self.ratio = ratio
        self.downsample = highest_attention_downsample(unet)
        self._size: tuple[int, int] = (0, 0)
        self._merge: Merge | None = None
        # conv_in runs first in every forward, the shallow UNet's (DeepCache) too
        cast_unet: Any = unet
        cast_unet.conv_in.register_forward_pre_hook(self._record_size)
        for block in transformer_blocks(unet):
            attention: Any = block.attn1  # diffusers' Attention
            block.register_forward_pre_hook(self._match, with_kwargs=True)
            attention.register_forward_pre_hook(self._merge_tokens, with_kwargs=True)
            attention.register_forward_hook(self._unmerge_tokens)

    def _record_size(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        height, width = args[0].shape[-2:]
        self._size = (int(height), int(width))

    def _match(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        height, width = (math.ceil(side / self.downsample) for side in self._size)
        tokens = hidden.shape[1]
        # Only the blocks at the chosen resolution merge (tomesd's max_downsample).
        self._merge = (
            Merge(hidden, height, width, int(tokens * self.ratio))
            if tokens == height * width
            else None
        )

    def _merge_tokens(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._merge is None:
            return None
        if args:
            return (self._merge.merge(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._merge.merge(kwargs["hidden_states"])}

    def _unmerge_tokens(self, module: nn.Module, args: Any, output: torch.Tensor) -> Any:
        merge, self._merge = self._merge, None
        return None if merge is None else merge.unmerge(output)


def transformer_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's transformer blocks (diffusers' BasicTransformerBlock: norm1, attn1, ...)."""
    return [
        module
        for module in unet.modules()
        if type(module).__name__ == "BasicTransformerBlock" and hasattr(module, "attn1")
    ]


def highest_attention_downsample(unet: nn.Module) -> int:
    """How many times the latent is halved at the UNet's first down block with attention
    (SD 1.x/2.x: 1, its first block; SDXL: 2): tomesd's max_downsample for that UNet."""
    for index, block in enumerate(getattr(unet, "down_blocks", ())):
        if getattr(block, "attentions", None):
            return int(2**index)
    raise UnsupportedError(
        f"{type(unet).__name__} has no down block with attention to merge tokens in; build "
        "without model.token_merging_ratio"
    )


def merge_unet_tokens(unet: nn.Module, ratio: float) -> nn.Module:
    """`unet` with [model] token_merging_ratio's hooks (none for 0)."""
    if ratio > 0:
        UNetTokenMerging(unet, ratio)
    return unet


__all__ = ["Merge", "UNetTokenMerging", "merge_unet_tokens", "partition"]
