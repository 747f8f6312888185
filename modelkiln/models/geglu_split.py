"""GEGLU's projection exported as two matmuls, one per half.

diffusers' GEGLU (the feed-forward of every SD and SDXL transformer block) projects to twice
its width and chunks the result into a value and a gate. OpenVINO's CPU plugin runs that
chunk as a reference-kernel split, a copy of the widest activation of the block: 27 ms of an
SD-1.5-sized UNet step (1.35 s, batch 2, bf16 on an Intel Xeon with AMX). Projecting with each
half of the same weights computes the same two tensors (each output is the same dot product;
float rounding may differ) with no split; the UNet step ran 2 % faster. Weight-only
quantization and LoRA fusing see the two halves as the one Linear they are; a projection
whose weights torchao quantized (ExecuTorch's int8) keeps diffusers' forward.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def split_geglu_projections(model: nn.Module) -> nn.Module:
    """`model` with each GEGLU projecting its value and gate halves separately."""
    from diffusers.models.activations import GEGLU

    for module in model.modules():
        if isinstance(module, GEGLU) and type(module.proj) is nn.Linear:
            module.forward = MethodType(_two_projections, module)  # type: ignore[method-assign]
    return model


def _two_projections(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    hooked = self.proj._forward_hooks or self.proj._forward_pre_hooks
    # A hook on the projection (a run-time LoRA slot's) must see it called, and quantized
    # weights (torchao's tensor subclasses) do not slice into halves that export can lift.
    if hooked or is_traceable_wrapper_subclass(self.proj.weight):
        value, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return value * self.gelu(gate)
    weight, bias = self.proj.weight, self.proj.bias
    half = weight.shape[0] // 2
    value = F.linear(hidden_states, weight[:half], None if bias is None else bias[:half])
    gate = F.linear(hidden_states, weight[half:], None if bias is None else bias[half:])
    return value * self.gelu(gate)
