"""Random LoRAs for a tiny SD / SDXL pipeline, written in the layouts users' files come in:
diffusers' (`save_lora_weights`), kohya/A1111's (`lora_unet_*` with lora_down / lora_up and an
alpha) and a peft adapter folder of the UNet (adapter_config.json + adapter_model.safetensors).

The adapters are made by peft itself (`inject_adapter_in_model` with random A and B), so the
expected fused weight of every layer is W + scale * (alpha / r) * B @ A.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_layers(
    pipeline_dir: str | Path,
    *,
    rank: int = 4,
    seed: int = 0,
    text_encoder: bool = True,
    unet_targets: Sequence[str] = UNET_TARGETS,
) -> dict[str, dict[str, Any]]:
    """component -> peft's LoRA state dict (`<module>.lora_A.weight`, `.lora_B.weight`) for
    the UNet's `unet_targets` (its attention projections) and (optionally) the text
    encoder's."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel

    folder = Path(pipeline_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(unet_targets))
    inject_adapter_in_model(_random(config), unet)
    layers = {"unet": _scaled(get_peft_model_state_dict(unet))}
    if text_encoder:
        model = CLIPTextModel.from_pretrained(folder / "text_encoder")
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_TARGETS)
        inject_adapter_in_model(_random(config), model)
        layers["text_encoder"] = _scaled(get_peft_model_state_dict(model))
    return layers


def _random(config: Any) -> Any:
    config.init_lora_weights = False  # B random too: an adapter that changes the model
    return config


def _scaled(state: dict[str, Any]) -> dict[str, Any]:
    """Small enough that the fused model still behaves (random B is as large as A)."""
    return {k: (v * 0.05 if ".lora_B." in k else v).contiguous() for k, v in state.items()}


def write_lora(
    layers: dict[str, dict[str, Any]],
    destination: str | Path,
    *,
    layout: str = "diffusers",
    alpha: float | None = None,
) -> Path:
    """`layers` (from lora_layers) as a LoRA in `layout`: a .safetensors file (diffusers,
    kohya) or a peft adapter folder (peft: the UNet's layers only). Every layout describes
    the same adapter: where it has an alpha (kohya's `.alpha`, peft's lora_alpha; default the
    rank), which scales B @ A by alpha / rank, B is stored divided by that."""
    from safetensors.torch import save_file

    destination = Path(destination)
    if layout == "diffusers":
        from diffusers import StableDiffusionPipeline

        with tempfile.TemporaryDirectory() as scratch:
            StableDiffusionPipeline.save_lora_weights(
                scratch,
                unet_lora_layers=layers["unet"],
                text_encoder_lora_layers=layers.get("text_encoder"),
                safe_serialization=True,
            )
            shutil.move(str(Path(scratch) / "pytorch_lora_weights.safetensors"), destination)
        return destination
    if layout == "kohya":
        tensors = {}
        for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
            for key, tensor in layers.get(component, {}).items():
                module, _, kind = key.rpartition(".lora_")
                if component == "text_encoder" and not module.startswith("text_model."):
                    module = f"text_model.{module}"  # kohya names CLIP's modules in full
                name = prefix + module.replace(".", "_")
                rank = tensor.shape[0] if kind.startswith("A") else tensor.shape[1]
                factor = (alpha if alpha is not None else rank) / rank
                if kind.startswith("A"):
                    tensors[f"{name}.lora_down.weight"] = tensor
                else:
                    tensors[f"{name}.lora_up.weight"] = (tensor / factor).contiguous()
                tensors[f"{name}.alpha"] = _scalar(factor * rank)
        save_file(tensors, str(destination))
        return destination
    if layout == "peft":
        import torch

        destination.mkdir(parents=True, exist_ok=True)
        unet = layers["unet"]
        rank = next(t.shape[0] for k, t in unet.items() if ".lora_A." in k)
        lora_alpha = alpha if alpha is not None else rank
        # peft multiplies B @ A by lora_alpha / r: store B so the adapter equals the others.
        tensors = {
            f"base_model.model.{k}": (t * rank / lora_alpha if ".lora_B." in k else t)
            for k, t in unet.items()
        }
        weights = {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}
        save_file(weights, str(destination / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": lora_alpha,
            "target_modules": UNET_TARGETS,
        }
        (destination / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
        return destination
    raise ValueError(f"unknown LoRA layout {layout!r}")


def _scalar(value: float) -> Any:
    import torch

    return torch.tensor(float(value))
