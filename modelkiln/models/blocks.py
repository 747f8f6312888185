"""Components cut into the blocks they run in order, so that a build can hold one block's
weights at a time (exporters/by_block.py): SD3's and Flux's transformers and the T5 encoder.

Each segment is a small module over the source model's own submodules (built on the meta
device: no weights until the build loads a segment's from the checkpoint) that takes and
returns named tensors. Run in order, each on the latest values of the names it takes, the
segments compute exactly what the component's export wrapper computes (tests pin that).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Segment:
    name: str  # the blocks' own names: "transformer_blocks.7", "embed", "out"
    module: nn.Module
    inputs: tuple[str, ...]  # component inputs, or outputs of earlier segments
    outputs: tuple[str, ...]  # the last segment's are the component's outputs

    def run(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Its outputs, by name, from the latest `values` of the names it takes."""
        out = self.module(*[values[name] for name in self.inputs])
        return dict(zip(self.outputs, out, strict=True))

    def weight_bytes(self, itemsize: int = 4) -> int:
        """What its weights take at `itemsize` bytes per value (read from meta tensors)."""
        seen: set[int] = set()
        total = 0
        for tensor in [*self.module.parameters(), *self.module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * itemsize
        return total


# --- SD3 / SD3.5 (SD3Transformer2DModel) -------------------------------------------------------


class _SD3Embed(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.pos_embed = model.pos_embed
        self.time_text_embed = model.time_text_embed
        self.context_embedder = model.context_embedder

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        tokens = self.pos_embed(hidden_states).contiguous()
        temb = self.time_text_embed(timestep, pooled_projections)
        return tokens, self.context_embedder(encoder_hidden_states), temb


class _JointBlock(nn.Module):
    """A dual-stream block: image and text tokens in, both out (the image stream alone for
    SD3's last block, which drops the text)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(
        self, tokens: torch.Tensor, context: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        context, tokens = self.block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
        return (tokens,) if context is None else (tokens, context)


class _RotaryBlock(nn.Module):
    """Flux's double- and single-stream blocks: the rotary embedding's cos and sin too (named
    inputs: the converters name a block's inputs after its forward's parameters)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(
        self,
        tokens: torch.Tensor,
        context: torch.Tensor,
        temb: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        context, tokens = self.block(
            hidden_states=tokens,
            encoder_hidden_states=context,
            temb=temb,
            image_rotary_emb=(rope_cos, rope_sin),
        )
        return tokens, context


class _SD3Out(nn.Module):
    """norm_out, proj_out and the unpatchify of SD3Transformer2DModel.forward; the latents
    (a component input) give the height and width."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.norm_out = model.norm_out
        self.proj_out = model.proj_out
        self.patch_size = int(model.config.patch_size)
        self.out_channels = int(model.out_channels)

    def forward(
        self, tokens: torch.Tensor, temb: torch.Tensor, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor]:
        height, width = hidden_states.shape[-2:]
        patch = self.patch_size
        out = self.proj_out(self.norm_out(tokens, temb))
        out = out.reshape(out.shape[0], height // patch, width // patch, patch, patch, -1)
        out = torch.einsum("nhwpqc->nchpwq", out)
        return (out.reshape(out.shape[0], self.out_channels, height, width),)


def _sd3(model: Any, outputs: tuple[str, ...]) -> list[Segment]:
    pieces = [
        Segment(
            "embed",
            _SD3Embed(model),
            ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"),
            ("tokens", "context", "temb"),
        )
    ]
    for index, block in enumerate(model.transformer_blocks):
        kept = ("tokens",) if block.context_pre_only else ("tokens", "context")
        pieces.append(
            Segment(
                f"transformer_blocks.{index}",
                _JointBlock(block),
                ("tokens", "context", "temb"),
                kept,
            )
        )
    pieces.append(Segment("out", _SD3Out(model), ("tokens", "temb", "hidden_states"), outputs))
    return pieces


# --- Flux.1 (FluxTransformer2DModel) -----------------------------------------------------------


class _FluxEmbed(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.x_embedder = model.x_embedder
        self.time_text_embed = model.time_text_embed
        self.context_embedder = model.context_embedder
        self.pos_embed = model.pos_embed
        self.guidance = bool(model.config.guidance_embeds)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        tokens = self.x_embedder(hidden_states)
        timestep = timestep.to(tokens.dtype) * 1000
        if guidance is None:
            temb = self.time_text_embed(timestep, pooled_projections)
        else:
            temb = self.time_text_embed(
                timestep, guidance.to(tokens.dtype) * 1000, pooled_projections
            )
        cos, sin = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        return tokens, self.context_embedder(encoder_hidden_states), temb, cos, sin


class _FluxOut(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.norm_out = model.norm_out
        self.proj_out = model.proj_out

    def forward(self, tokens: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.proj_out(self.norm_out(tokens, temb)),)


def _flux(model: Any, outputs: tuple[str, ...]) -> list[Segment]:
    inputs: tuple[str, ...] = (
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
    )
    inputs += ("img_ids", "txt_ids") + (("guidance",) if model.config.guidance_embeds else ())
    stream = ("tokens", "context", "temb", "rope_cos", "rope_sin")
    pieces = [Segment("embed", _FluxEmbed(model), inputs, stream)]
    for kind in ("transformer_blocks", "single_transformer_blocks"):
        for index, block in enumerate(getattr(model, kind)):
            module = _RotaryBlock(block)
            pieces.append(Segment(f"{kind}.{index}", module, stream, ("tokens", "context")))
    pieces.append(Segment("out", _FluxOut(model), ("tokens", "temb"), outputs))
    return pieces


# --- T5 encoder (T5EncoderModel, attn_implementation="eager") --------------------------------


class _T5Embed(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.embed_tokens = model.encoder.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.embed_tokens(input_ids),)


class _T5Block(nn.Module):
    """A T5 layer; the first computes the relative position bias the others reuse. Without an
    attention mask, as the wrapper calls T5 (SD3 and Flux pad to a fixed length unmasked)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, tokens: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.block(tokens, None, bias)[0],)


class _T5FirstBlock(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.block(tokens, None, None)
        return out[0], out[1]


class _T5Out(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.final_layer_norm = model.encoder.final_layer_norm

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.final_layer_norm(tokens),)


def _t5(model: Any, outputs: tuple[str, ...]) -> list[Segment]:
    pieces = [Segment("embed", _T5Embed(model), ("input_ids",), ("tokens",))]
    for index, block in enumerate(model.encoder.block):
        if index == 0:
            segment = Segment("block.0", _T5FirstBlock(block), ("tokens",), ("tokens", "bias"))
        else:
            segment = Segment(f"block.{index}", _T5Block(block), ("tokens", "bias"), ("tokens",))
        pieces.append(segment)
    pieces.append(Segment("final_layer_norm", _T5Out(model), ("tokens",), outputs))
    return pieces


SEGMENTERS: dict[str, Callable[[Any, tuple[str, ...]], list[Segment]]] = {
    "SD3Transformer2DModel": _sd3,
    "FluxTransformer2DModel": _flux,
    "T5EncoderModel": _t5,
}


def segments(wrapper: nn.Module, outputs: tuple[str, ...]) -> list[Segment] | None:
    """The blocks of an export wrapper (its source model is `wrapper.model`), the last one
    producing `outputs`; None for a model we cannot cut (it is built whole)."""
    model = getattr(wrapper, "model", None)
    segmenter = SEGMENTERS.get(type(model).__name__)
    return None if segmenter is None else segmenter(model, outputs)


def run_in_order(pieces: list[Segment], values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The segments run one after another on `values` (name -> tensor), which they update."""
    for piece in pieces:
        values.update(piece.run(values))
    return values


__all__ = ["SEGMENTERS", "Segment", "run_in_order", "segments"]
