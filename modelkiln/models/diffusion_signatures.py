"""The diffusers components' inputs and outputs as optimum exports them (text encoders, UNet,
VAE halves), and the config.json optimum keeps beside each: shared by the SD, SDXL, SD3 and
Flux families. Torch-free."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from modelkiln.diffusion.lora import LORA_RANK, slot_inputs
from modelkiln.specs import TensorSpec

TIMESTEPS = (0.0, 1000.0)
# Each family's text encoders and how they are exported: a CLIP's last hidden state and pooled
# output (clip), with every hidden state (clip-hidden-states), with its projection and every
# hidden state (clip-projection), or a T5 encoder's last hidden state (t5).
TEXT_ENCODERS: dict[str, dict[str, str]] = {
    "sd": {"text_encoder": "clip"},
    "sdxl": {"text_encoder": "clip-hidden-states", "text_encoder_2": "clip-projection"},
    "sd3": {
        "text_encoder": "clip-projection",
        "text_encoder_2": "clip-projection",
        "text_encoder_3": "t5",
    },
    "flux": {"text_encoder": "clip", "text_encoder_2": "t5"},
}
# optimum's export_model_type for each kind, kept in the component's config.json.
EXPORT_MODEL_TYPES = {
    "clip": "clip-text",
    "clip-hidden-states": "clip-text",
    "clip-projection": "clip-text-with-projection",
    "t5": "t5-encoder",
}


def text_encoder_signature(
    kind: str, config: Mapping[str, Any], sequence: int
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """A text encoder's inputs and outputs with optimum's names."""
    hidden = config["d_model"] if kind == "t5" else config["hidden_size"]
    ids = TensorSpec("int64", ("batch", sequence), value_range=(0, config["vocab_size"]))
    tokens = TensorSpec("float32", ("batch", sequence, hidden))
    if kind == "t5":
        return {"input_ids": ids}, {"last_hidden_state": tokens}
    states = {f"hidden_states.{i}": tokens for i in range(config["num_hidden_layers"] + 1)}
    if kind == "clip-projection":
        pooled = TensorSpec("float32", ("batch", config["projection_dim"]))
        return {"input_ids": ids}, {"text_embeds": pooled, "last_hidden_state": tokens, **states}
    outputs = {
        "last_hidden_state": tokens,
        "pooler_output": TensorSpec("float32", ("batch", hidden)),
    }
    return {"input_ids": ids}, {**outputs, **(states if kind == "clip-hidden-states" else {})}


def unet_signature(
    config: Mapping[str, Any], sequence: int, xl: bool
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    latent = ("latent_height", "latent_width")
    inputs = _denoiser_inputs(config, sequence, xl)
    outputs = {"out_sample": TensorSpec("float32", ("batch", config["out_channels"], *latent))}
    return inputs, outputs


def deep_features_spec(config: Mapping[str, Any]) -> TensorSpec:
    """DeepCache's kept features (models/deep_cache.py): the output of the UNet's last up
    block's first layer, the shallowest block's width at the latents' resolution."""
    width = int(config["block_out_channels"][0])
    return TensorSpec("float32", ("batch", width, "latent_height", "latent_width"))


def controlnet_residuals(
    config: Mapping[str, Any], latent_height: int, latent_width: int
) -> dict[str, TensorSpec]:
    """The residuals a ControlNet adds to a UNet of this config, as the UNet takes them:
    one after conv_in, one per resnet layer and downsampler of each down block, and the mid
    block's. Spatial sizes are concrete: a ControlNet build has a fixed resolution."""
    channels = list(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    sizes = [(channels[0], 1)]
    scale = 1
    for index, width in enumerate(channels):
        sizes += [(width, scale)] * layers
        if index < len(channels) - 1:
            scale *= 2
            sizes.append((width, scale))
    specs = {
        f"down_block_additional_residual_{i}": TensorSpec(
            "float32", ("batch", width, latent_height // s, latent_width // s)
        )
        for i, (width, s) in enumerate(sizes)
    }
    specs["mid_block_additional_residual"] = TensorSpec(
        "float32", ("batch", channels[-1], latent_height // scale, latent_width // scale)
    )
    return specs


def _denoiser_inputs(config: Mapping[str, Any], sequence: int, xl: bool) -> dict[str, TensorSpec]:
    """What a UNet and its ControlNet both take: latents, a timestep, the text states, and
    SDXL's pooled text embeddings and six size / crop ids."""
    inputs = {
        "sample": TensorSpec(
            "float32", ("batch", config["in_channels"], "latent_height", "latent_width")
        ),
        "timestep": TensorSpec("float32", (), value_range=TIMESTEPS),
        "encoder_hidden_states": TensorSpec(
            "float32", ("batch", sequence, _cross_attention_dim(config))
        ),
    }
    if xl:
        pooled = (
            config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        )
        inputs["text_embeds"] = TensorSpec("float32", ("batch", pooled))
        inputs["time_ids"] = TensorSpec("float32", ("batch", 6), value_range=(0, 1024))
    return inputs


def controlnet_signature(
    config: Mapping[str, Any], sequence: int, dims: Mapping[str, int], xl: bool
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """ControlNet: the UNet's inputs plus the control image (in [0, 1]) -> the residuals
    (their conditioning scale is applied by the pipeline)."""
    inputs = _denoiser_inputs(config, sequence, xl)
    inputs["controlnet_cond"] = TensorSpec(
        "float32", ("batch", 3, dims["height"], dims["width"]), value_range=(0.0, 1.0)
    )
    residuals = controlnet_residuals(config, dims["latent_height"], dims["latent_width"])
    outputs = {
        name.replace("down_block_additional_residual_", "down_block_res_sample_").replace(
            "mid_block_additional_residual", "mid_block_res_sample"
        ): spec
        for name, spec in residuals.items()
    }
    return inputs, outputs


def vae_signature(
    name: str, config: Mapping[str, Any]
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """vae_encoder: pixels -> latent_parameters; vae_decoder: latent_sample -> sample."""
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    channels = config.get("latent_channels", 4)
    if name == "vae_encoder":
        pixels = TensorSpec("float32", ("batch", 3, "height", "width"), value_range=(-1.0, 1.0))
        moments = TensorSpec(
            "float32", ("batch", 2 * channels, f"height / {factor}", f"width / {factor}")
        )
        return {"sample": pixels}, {"latent_parameters": moments}
    latents = TensorSpec("float32", ("batch", channels, "latent_height", "latent_width"))
    image = TensorSpec(
        "float32", ("batch", 3, f"latent_height * {factor}", f"latent_width * {factor}")
    )
    return {"latent_sample": latents}, {"sample": image}


# The rank of the example LoRA matrices an export traces (not 1: torch.export would
# specialise a dim of size 1), and their values: small, as a trained LoRA's are.
EXAMPLE_RANK = 4
SLOT_VALUES = (-0.05, 0.05)


def lora_slot_inputs(layers: Mapping[str, tuple[int, int]]) -> dict[str, TensorSpec]:
    """Each slot layer's A (rank, in) and B (out, rank): optional, zeros being no LoRA."""
    inputs = {}
    for layer, (in_features, out_features) in layers.items():
        down, up = slot_inputs(layer)
        inputs[down] = TensorSpec(
            "float32", (LORA_RANK, in_features), value_range=SLOT_VALUES, optional=True
        )
        inputs[up] = TensorSpec(
            "float32", (out_features, LORA_RANK), value_range=SLOT_VALUES, optional=True
        )
    return inputs


def _cross_attention_dim(config: Mapping[str, Any]) -> int:
    dim = config["cross_attention_dim"]
    return int(dim[0] if isinstance(dim, list | tuple) else dim)


def component_config(name: str, config: Mapping[str, Any], text_kind: str | None) -> bytes:
    """The config.json optimum keeps beside each exported component."""
    data = dict(config)
    if text_kind is not None:
        data["export_model_type"] = EXPORT_MODEL_TYPES[text_kind]
        if text_kind.startswith("clip-"):  # SDXL and SD3 read the hidden states
            data["output_hidden_states"] = True
    return (json.dumps(data, indent=2) + "\n").encode()


__all__ = [
    "EXAMPLE_RANK",
    "EXPORT_MODEL_TYPES",
    "LORA_RANK",
    "TEXT_ENCODERS",
    "TIMESTEPS",
    "component_config",
    "controlnet_residuals",
    "controlnet_signature",
    "lora_slot_inputs",
    "text_encoder_signature",
    "unet_signature",
    "vae_signature",
]
