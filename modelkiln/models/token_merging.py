"""Token merging (ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023) in the
ViT family's exported module: after every transformer block, the `r` most similar pairs of
patch tokens become one, so each later block runs on fewer tokens.

Bipartite soft matching, as the paper's reference code does it: the patch tokens alternate
between two sets, each token of the first set is matched with its most similar token of the
second (cosine of the tokens), and the `r` best-matched ones are averaged into their partners,
weighted by how many original patches each already holds. Prefix tokens (class,
distillation, registers) are never merged. Unlike the paper, similarity is measured on the
block's output rather than on its attention keys, and the attention is not made proportional
to token size: both need the attention's internals, and this runs on every architecture the
family loads (transformers ViT, DeiT, DINOv2, CLIP and SigLIP towers, timm) by hooking their
blocks. The classifier reads the class token, so only classification exports merge (their
other outputs would have fewer tokens than the model's). The torch reference of the build
stays unmerged: the end-to-end gate measures what merging costs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from modelkiln.errors import UnsupportedError


def merge_tokens(
    hidden: torch.Tensor, sizes: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, C) tokens holding (B, N, 1) patches each -> N - r tokens, the `r` most similar
    pairs of patch tokens averaged (weighted by their sizes); the first `prefix` kept."""
    kept, tokens = hidden[:, :prefix], hidden[:, prefix:]
    kept_sizes, token_sizes = sizes[:, :prefix], sizes[:, prefix:]
    r = min(r, tokens.shape[1] // 2)
    if r <= 0:
        return hidden, sizes
    metric = tokens / tokens.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    best, partner = scores.max(dim=-1)
    # topk of every score is the descending argsort (ExecuTorch has no sort kernel)
    order = best.topk(best.shape[-1], dim=-1).indices[..., None]
    stay, move = order[:, r:], order[:, :r]
    into = partner[..., None].gather(1, move)
    weighted = tokens * token_sizes

    def merged(values: torch.Tensor) -> torch.Tensor:
        width = values.shape[-1]
        first, second = values[:, ::2], values[:, 1::2]
        unmatched = first.gather(1, stay.expand(-1, -1, width))
        moved = first.gather(1, move.expand(-1, -1, width))
        return torch.cat([unmatched, second.scatter_add(1, into.expand(-1, -1, width), moved)], 1)

    # Summed in fp32: half precision would round the sums of large merged tokens (an ONNX
    # fp16 export keeps its ScatterElements in fp32 too: quantize/onnx.py's to_fp16).
    summed, counts = merged(weighted.float()), merged(token_sizes.float())
    merged_tokens = (summed / counts).to(hidden.dtype)
    return torch.cat([kept, merged_tokens], 1), torch.cat([kept_sizes, counts.to(sizes.dtype)], 1)


class TokenMerging:
    """Hooks on a model's transformer blocks that merge `r` tokens after each, while active."""

    def __init__(self, blocks: nn.ModuleList, r: int, prefix: int) -> None:
        self.r, self.prefix = r, prefix
        self.active = False
        self._sizes: torch.Tensor | None = None
        blocks[0].register_forward_pre_hook(self._start)
        for block in blocks:
            block.register_forward_pre_hook(self._unmasked, with_kwargs=True)
            block.register_forward_hook(self._merge)

    @contextlib.contextmanager
    def enabled(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _start(self, module: nn.Module, args: Any) -> None:
        self._sizes = None  # every forward starts from one patch per token

    def _unmasked(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The blocks without the attention mask their model made for the unmerged sequence
        (transformers materializes one while torch.export traces): a vision encoder's mask
        allows every token, which no mask says too."""
        if not self.active:
            return None
        rest = tuple(None if isinstance(value, torch.Tensor) else value for value in args[1:])
        unmasked = {key: None if "mask" in key else value for key, value in kwargs.items()}
        return (args[0], *rest), unmasked

    def _merge(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not self.active:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        sizes = self._sizes
        if sizes is None:
            sizes = torch.ones_like(hidden[..., :1])
        hidden, self._sizes = merge_tokens(hidden, sizes, self.r, self.prefix)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class Merged(nn.Module):
    """An export wrapper that runs its model with token merging on."""

    def __init__(self, inner: nn.Module, merging: TokenMerging) -> None:
        super().__init__()
        self.inner = inner
        self.merging = merging

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self.merging.enabled():
            return self.inner(pixel_values)


def transformer_blocks(model: nn.Module, count: int) -> nn.ModuleList:
    """The model's `count` transformer blocks: its one ModuleList of that many blocks of one
    class (encoder.layer, encoder.layers, blocks, ...)."""
    found = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == count
        and len({type(block) for block in module}) == 1
    ]
    if len(found) != 1:
        raise UnsupportedError(
            f"cannot find the {count} transformer blocks of {type(model).__name__} to merge "
            "tokens between; build without model.token_merging"
        )
    return found[0]


__all__ = ["Merged", "TokenMerging", "merge_tokens", "transformer_blocks"]
