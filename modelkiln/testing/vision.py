"""Tiny ViTs (transformers and timm) with random weights, saved as the hub serves them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_IMAGE_SIZE = 32
TINY_NUM_LABELS = 10


def tiny_hf_vit(
    directory: str | Path,
    *,
    classifier: bool = True,
    num_labels: int = TINY_NUM_LABELS,
    image_size: int = TINY_IMAGE_SIZE,
    hidden_size: int = 32,
    seed: int = 0,
) -> Path:
    """A 2-block ViT (hidden 32 unless asked) as a transformers model directory with its
    image processor. hidden_size=64 puts every linear weight over coremltools' default
    compression threshold (2048 elements)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

    directory = Path(directory)
    torch.manual_seed(seed)
    settings: dict[str, Any] = dict(
        image_size=image_size,
        patch_size=8,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        num_labels=num_labels,
        id2label={i: f"class_{i}" for i in range(num_labels)},
        label2id={f"class_{i}": i for i in range(num_labels)},
    )
    config = ViTConfig(**settings)
    model = ViTForImageClassification(config) if classifier else ViTModel(config)
    model.eval().save_pretrained(directory)
    processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    processor.save_pretrained(directory)
    return directory


def tiny_timm_vit(
    directory: str | Path,
    *,
    num_classes: int = TINY_NUM_LABELS,
    image_size: int = TINY_IMAGE_SIZE,
    seed: int = 0,
) -> Path:
    """A 2-block timm ViT in the layout timm pushes to the hub (config.json + safetensors)."""
    import timm
    import torch
    from timm.models import save_for_hf

    directory = Path(directory)
    torch.manual_seed(seed)
    args: dict[str, Any] = {
        "img_size": image_size,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "num_classes": num_classes,
    }
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    save_for_hf(model, str(directory), model_args=args, safe_serialization=True)
    return directory


# --- Stable Diffusion --------------------------------------------------------------------
