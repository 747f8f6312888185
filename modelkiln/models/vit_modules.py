"""Torch side of the ViT family: loading transformers / timm models and the export wrappers.

Each wrapper takes `pixel_values` and returns a tuple in the order of the component's outputs,
so one wrapper serves the torch reference, the ONNX exporter and the OpenVINO converter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelkiln.errors import SourceError, UnsupportedError
from modelkiln.quiet import quiet_libraries

TRANSFORMERS_ARCHITECTURES = ("ViTForImageClassification", "ViTModel")


def load_transformers(directory: Path, architecture: str, *, pickle: bool) -> Any:
    import transformers

    if architecture not in TRANSFORMERS_ARCHITECTURES:
        raise UnsupportedError(
            f"transformers architecture '{architecture}' is not supported; supported: "
            f"{', '.join(TRANSFORMERS_ARCHITECTURES)}"
        )
    model_class = getattr(transformers, architecture)
    try:
        # fp32 always: the reference every export is validated against.
        with quiet_libraries():
            model = model_class.from_pretrained(
                directory, use_safetensors=not pickle, dtype=torch.float32
            )
    except (OSError, ValueError, RuntimeError) as error:
        raise SourceError(
            f"transformers cannot load {architecture} from {directory}: "
            f"{str(error).strip().splitlines()[0]}"
        ) from error
    return model.eval()


def load_timm(directory: Path) -> Any:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    try:
        model = timm.create_model(f"local-dir:{directory}", pretrained=True)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise SourceError(
            f"timm cannot load {directory}: {str(error).strip().splitlines()[0]}"
        ) from error
    if not isinstance(model, VisionTransformer):
        raise UnsupportedError(
            f"timm model '{type(model).__name__}' in {directory} is not a vision transformer; "
            "supported: timm VisionTransformer models (vit_*, deit_*, ...)"
        )
    return model.eval()


class HFClassifier(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.model(pixel_values=pixel_values).logits,)


class HFFeatures(nn.Module):
    """last_hidden_state, pooler_output (when the model has a pooler), hidden_state_<k>..."""

    def __init__(self, backbone: nn.Module, hidden_layers: tuple[int, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        self.hidden_layers = hidden_layers
        self.has_pooler = getattr(backbone, "pooler", None) is not None

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.backbone(
            pixel_values=pixel_values, output_hidden_states=bool(self.hidden_layers)
        )
        results = [out.last_hidden_state]
        if self.has_pooler:
            results.append(out.pooler_output)
        # hidden_states[0] is the embedding output; hidden_states[k] is block k's output.
        results += [out.hidden_states[k] for k in self.hidden_layers]
        return tuple(results)


class TimmClassifier(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.model(pixel_values),)


class TimmFeatures(nn.Module):
    model: Any  # a timm VisionTransformer (forward_intermediates, forward_head, ...)

    def __init__(self, model: nn.Module, hidden_layers: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.hidden_layers = hidden_layers
        self.has_pooler = bool(model.global_pool)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.hidden_layers:
            features, intermediates = self.model.forward_intermediates(
                pixel_values,
                indices=[k - 1 for k in self.hidden_layers],
                return_prefix_tokens=True,
                output_fmt="NLC",
            )
            hidden = [torch.cat([prefix, tokens], dim=1) for tokens, prefix in intermediates]
        else:
            features, hidden = self.model.forward_features(pixel_values), []
        results = [features]
        if self.has_pooler:
            results.append(self.model.forward_head(features, pre_logits=True))
        return tuple(results + hidden)


def wrap(model: nn.Module, library: str, task: str, hidden_layers: tuple[int, ...]) -> nn.Module:
    """The export wrapper for a task; a classifier source can also serve feature extraction."""
    if library == "transformers":
        if task == "image-classification":
            return HFClassifier(model).eval()
        backbone = getattr(model, "vit", model)  # ViTForImageClassification keeps it in .vit
        return HFFeatures(backbone, hidden_layers).eval()
    if task == "image-classification":
        return TimmClassifier(model).eval()
    return TimmFeatures(model, hidden_layers).eval()
