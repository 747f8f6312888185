"""First Block Cache for SD3's and Flux's transformers: the torch side (the runtime side and
why: diffusion/block_cache.py).

Hooks on diffusers' own transformer read the first block's input and output image tokens and
what reaches `norm_out` after the last block, so its forward runs unchanged:
- `CachingTransformer`: the transformer's wrapper, also returning the first block's residual
  and what the later blocks added (the tail residual);
- `TransformerHead`: the same transformer cut to its first block, taking a tail residual and
  adding it before `norm_out`: on a step that reuses the later blocks it is the whole
  transformer's output, computed from the embeddings, one block and the output layers.

SD3's image tokens come from latent patches: its residuals travel in the latents' layout
(batch, width / patch², latent height, latent width), a relabelling that keeps every dim one
the exporters already bound (the token count would be a product of two of them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelkiln.diffusion.block_cache import (
    FIRST_BLOCK_RESIDUAL,
    TAIL_BLOCKS_RESIDUAL,
    TRANSFORMER_HEAD,
)


class _Taps:
    """Forward hooks on a diffusers SD3 / Flux transformer: the first block's residual on
    the image tokens, what the blocks after it added, and a kept residual to add instead."""

    def __init__(self, model: Any) -> None:
        self.first_out: torch.Tensor | None = None
        self.first_residual: torch.Tensor | None = None
        self.tail_residual: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None
        model.transformer_blocks[0].register_forward_hook(self._after_first, with_kwargs=True)
        model.norm_out.register_forward_pre_hook(self._before_output)

    def _after_first(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        # diffusers' joint blocks return (encoder_hidden_states, hidden_states).
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.first_out = output[1]
        self.first_residual = output[1] - hidden

    def _before_output(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        hidden, *rest = args
        assert self.first_out is not None  # the first block ran
        self.tail_residual = hidden - self.first_out
        if self.kept is None:
            return None
        return (hidden + self.kept, *rest)


class CachingTransformer(nn.Module):
    """A transformer wrapper (SD3Transformer, FluxTransformer) whose outputs gain
    first_block_residual and tail_blocks_residual. `patch`: SD3's latent patch size (its
    residuals in the latents' layout), None for Flux's packed tokens."""

    model: Any  # the diffusers transformer
    wrapper: nn.Module

    def __init__(self, wrapper: nn.Module, patch: int | None) -> None:
        super().__init__()
        self.model = wrapper.model
        object.__setattr__(self, "wrapper", wrapper)  # not a submodule: one name per weight
        self.patch = patch
        self._taps = _Taps(self.model)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (out,) = self.wrapper(*inputs)
        taps = self._taps
        assert taps.first_residual is not None and taps.tail_residual is not None
        return (
            out,
            self._outward(taps.first_residual, inputs[0]),
            self._outward(taps.tail_residual, inputs[0]),
        )

    def _outward(self, tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if self.patch is None:
            return tokens
        return to_latent_layout(tokens, latents.shape[-2], latents.shape[-1], self.patch)

    def _inward(self, residual: torch.Tensor) -> torch.Tensor:
        return residual if self.patch is None else to_tokens(residual, self.patch)


class TransformerHead(CachingTransformer):
    """The transformer's inputs, then tail_blocks_residual -> out_hidden_states (the whole
    transformer's output where the later blocks add that residual again),
    first_block_residual."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *given, tail = inputs
        self._taps.kept = self._inward(tail)
        try:
            (out,) = self.wrapper(*given)
        finally:
            self._taps.kept = None
        assert self._taps.first_residual is not None
        return out, self._outward(self._taps.first_residual, given[0])


def to_latent_layout(tokens: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """SD3's (batch, patches, width) image tokens, row-major over the latents' patch grid,
    as (batch, width / patch², height, width): each token's features spread over its patch."""
    batch, _, features = tokens.shape
    channels = features // (patch * patch)
    grid = tokens.reshape(batch, height // patch, width // patch, patch, patch, channels)
    return grid.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


def to_tokens(residual: torch.Tensor, patch: int) -> torch.Tensor:
    """The inverse of to_latent_layout."""
    batch, channels, height, width = residual.shape
    grid = residual.reshape(batch, channels, height // patch, patch, width // patch, patch)
    tokens = grid.permute(0, 2, 4, 3, 5, 1)
    return tokens.reshape(batch, (height // patch) * (width // patch), channels * patch * patch)


def transformer_head(wrapper: nn.Module, patch: int | None) -> TransformerHead:
    """`wrapper`'s transformer (one of its own) cut to its first block: the reference
    pipeline holds it beside the whole transformer."""
    model: Any = wrapper.model
    model.transformer_blocks = nn.ModuleList(list(model.transformer_blocks)[:1])
    if hasattr(model, "single_transformer_blocks"):  # Flux's single-stream blocks
        model.single_transformer_blocks = nn.ModuleList()
    return TransformerHead(wrapper, patch)


__all__ = [
    "FIRST_BLOCK_RESIDUAL",
    "TAIL_BLOCKS_RESIDUAL",
    "TRANSFORMER_HEAD",
    "CachingTransformer",
    "TransformerHead",
    "to_latent_layout",
    "to_tokens",
    "transformer_head",
]
