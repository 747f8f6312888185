"""Tiny ViTs (transformers and timm) and the encoders built like them (DeiT, DINOv2, CLIP,
SigLIP) with random weights, saved as the hub serves them."""

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
    architecture: str = "vit_tiny_patch16_224",
) -> Path:
    """A 2-block timm ViT in the layout timm pushes to the hub (config.json + safetensors).
    `architecture` picks the variant: DeiT distilled (deit_tiny_distilled_patch16_224), DINOv2
    with registers (vit_small_patch14_reg4_dinov2), CLIP's image tower
    (vit_base_patch16_clip_224), ..."""
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
    model = timm.create_model(architecture, pretrained=False, **args).eval()
    save_for_hf(model, str(directory), model_args=args, safe_serialization=True)
    return directory


ENCODERS = ("deit", "dinov2", "dinov2-registers", "clip", "siglip-vision")


def tiny_hf_encoder(
    directory: str | Path,
    kind: str,
    *,
    classifier: bool = False,
    num_labels: int = TINY_NUM_LABELS,
    seed: int = 0,
) -> Path:
    """A 2-block transformers vision encoder of `kind` (ENCODERS) at 32x32 with its image
    processor: DeiT with its distillation token (classifier: the with-teacher head), DINOv2
    (with 2 registers), a whole CLIPModel (both towers, with a tiny CLIP tokenizer) and
    SigLIP's vision tower."""
    import torch
    import transformers as tf

    directory = Path(directory)
    torch.manual_seed(seed)
    size = TINY_IMAGE_SIZE
    common: dict[str, Any] = dict(
        image_size=size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    labels: dict[str, Any] = dict(
        num_labels=num_labels,
        id2label={i: f"class_{i}" for i in range(num_labels)},
        label2id={f"class_{i}": i for i in range(num_labels)},
    )
    crop = {"height": size, "width": size}
    config: Any
    model: Any
    extra: dict[str, Any]
    if kind == "deit":
        config = tf.DeiTConfig(**common, **labels)
        model = (
            tf.DeiTForImageClassificationWithTeacher(config) if classifier else tf.DeiTModel(config)
        )
        processor: Any = tf.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size=crop)
    elif kind in ("dinov2", "dinov2-registers"):
        registers = kind == "dinov2-registers"
        config_class = tf.Dinov2WithRegistersConfig if registers else tf.Dinov2Config
        extra = {"num_register_tokens": 2} if registers else {}
        config = config_class(**common, mlp_ratio=2, **labels, **extra)
        prefix = "Dinov2WithRegisters" if registers else "Dinov2"
        suffix = "ForImageClassification" if classifier else "Model"
        model = getattr(tf, prefix + suffix)(config)
        processor = tf.BitImageProcessor(size={"shortest_edge": 36}, crop_size=crop)
    elif kind == "clip":
        from modelkiln.testing.diffusion import write_tiny_clip_tokenizer

        text = dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=1000,
            max_position_embeddings=16,
            bos_token_id=523,  # <|startoftext|> in the tiny vocabulary
            eos_token_id=524,
            pad_token_id=524,
        )
        config = tf.CLIPConfig(text_config=text, vision_config=common, projection_dim=16)
        model = tf.CLIPModel(config)
        processor = tf.CLIPImageProcessor(size={"shortest_edge": size}, crop_size=crop)
        write_tiny_clip_tokenizer(directory, model_max_length=16)
    elif kind == "siglip-vision":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**common))
        processor = tf.SiglipImageProcessor(size={"height": size, "width": size})
    else:
        raise ValueError(f"unknown encoder kind {kind!r}; known: {', '.join(ENCODERS)}")
    model.eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# --- Stable Diffusion --------------------------------------------------------------------
