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

# The transformers vision encoders the family builds. A classifier's backbone is its
# base_model (model.vit, model.deit, model.dinov2, ...).
TRANSFORMERS_ARCHITECTURES = (
    "ViTForImageClassification",
    "ViTModel",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",  # logits: the mean of its two heads
    "DeiTModel",
    "Dinov2ForImageClassification",
    "Dinov2Model",
    "Dinov2WithRegistersForImageClassification",
    "Dinov2WithRegistersModel",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",  # image_embeds: CLIP's retrieval embedding
    "SiglipVisionModel",
)
# Whole two-tower models whose vision tower is built: CLIPModel's with its projection.
VISION_TOWERS = {"CLIPModel": "CLIPVisionModelWithProjection", "SiglipModel": "SiglipVisionModel"}
# What a feature wrapper returns before any hidden_state_<k>, in this order, where present.
FEATURE_OUTPUTS = ("image_embeds", "last_hidden_state", "pooler_output")


def is_classifier(architecture: str) -> bool:
    return "ForImageClassification" in architecture


def vision_architecture(architecture: str) -> str:
    """The class that loads the vision encoder of a directory saved as `architecture`."""
    return VISION_TOWERS.get(architecture, architecture)


def load_transformers(directory: Path, architecture: str, *, pickle: bool) -> Any:
    import transformers

    tower = vision_architecture(architecture)
    if tower not in TRANSFORMERS_ARCHITECTURES:
        raise UnsupportedError(
            f"transformers architecture '{architecture}' is not supported; supported: "
            f"{', '.join([*TRANSFORMERS_ARCHITECTURES, *VISION_TOWERS])}"
        )
    # A two-tower model's vision half is loaded with the tower's part of its config.
    return _from_pretrained(
        getattr(transformers, tower), directory, pickle=pickle, tower=tower != architecture
    )


def load_clip_text(directory: Path) -> Any:
    """The text tower of a CLIPModel directory, with its projection (text_embeds)."""
    from transformers import CLIPTextModelWithProjection

    return _from_pretrained(CLIPTextModelWithProjection, directory, pickle=False, tower=True)


def _from_pretrained(model_class: Any, directory: Path, *, pickle: bool, tower: bool) -> Any:
    """The model in fp32 always: the reference every export is validated against."""
    kwargs: dict[str, Any] = {"use_safetensors": not pickle, "dtype": torch.float32}
    try:
        with quiet_libraries():
            if tower:
                kwargs["config"] = _tower_config(model_class, directory)
            model = model_class.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise SourceError(
            f"transformers cannot load {model_class.__name__} from {directory}: "
            f"{str(error).strip().splitlines()[0]}"
        ) from error
    return model.eval()


class ClipTextEmbeds(nn.Module):
    """input_ids -> text_embeds (the projected embedding zero-shot compares with the image's),
    last_hidden_state: optimum's names for CLIP's text tower."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids)
        return (out.text_embeds, out.last_hidden_state)


def save_transformers(model: Any, out: Path) -> None:
    """A transformers model's weights and config, as reference_module loads them back."""
    with quiet_libraries():
        model.save_pretrained(out)


def _tower_config(model_class: Any, directory: Path) -> Any:
    """A tower's config inside a CLIPModel's, with the projection width of the whole model
    (the tower config's own projection_dim is its class default where it was not saved)."""
    import json

    config = model_class.config_class.from_pretrained(directory)
    whole = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if "projection_dim" in whole and hasattr(config, "projection_dim"):
        config.projection_dim = whole["projection_dim"]
    return config


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
    """The encoder's own outputs of FEATURE_OUTPUTS (image_embeds for CLIP with projection,
    pooler_output where the model pools), then hidden_state_<k>..."""

    def __init__(self, backbone: nn.Module, hidden_layers: tuple[int, ...]) -> None:
        super().__init__()
        self.backbone = backbone
        self.hidden_layers = hidden_layers
        self.output_shapes = _probe(backbone)  # which outputs this class returns, and shapes
        self.has_pooler = "pooler_output" in self.output_shapes

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.backbone(
            pixel_values=pixel_values, output_hidden_states=bool(self.hidden_layers)
        )
        results = [out[name] for name in self.output_shapes]
        # hidden_states[0] is the embedding output; hidden_states[k] is block k's output.
        results += [out.hidden_states[k] for k in self.hidden_layers]
        return tuple(results)


def _probe(backbone: nn.Module) -> dict[str, tuple[int, ...]]:
    """The FEATURE_OUTPUTS a model returns and their shapes past the batch, from one call on
    a blank image (transformers' output classes differ by model: CLIP with projection has no
    pooler_output, DINOv2 pools without a pooler module)."""
    config: Any = backbone.config
    size = config.image_size
    height, width = size if isinstance(size, list | tuple) else (size, size)
    blank = torch.zeros(1, config.num_channels, height, width)
    with torch.inference_mode():
        out = backbone(pixel_values=blank)
    return {
        name: tuple(out[name].shape[1:])
        for name in FEATURE_OUTPUTS
        if name in out and out[name] is not None
    }


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
        # A classifier's encoder, without its head (ViTForImageClassification's .vit, ...).
        backbone: Any = model.base_model if is_classifier(type(model).__name__) else model
        return HFFeatures(backbone, hidden_layers).eval()
    if task == "image-classification":
        return TimmClassifier(model).eval()
    return TimmFeatures(model, hidden_layers).eval()
