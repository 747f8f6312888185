"""A diffusers SD / SDXL / SD3 pipeline folder as one checkpoint in the original (LDM / SGM /
MMDiT) layout: the single `.safetensors` file AUTOMATIC1111, ComfyUI and SD.Next load.

diffusers converts only the other way (`from_single_file`), so these are the inverse key maps
of its loaders (`diffusers.loaders.single_file_utils`), and the tests pin them to it: a folder
written as a single file and loaded back with `from_single_file` gives every tensor
bit-identically. Tensors are read from the folder's safetensors files as stored (their dtype
kept); no model is built.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import SourceError, UnsupportedError

if TYPE_CHECKING:
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each pipeline keeps its text encoders in a single file: CLIP-L as transformers
# spells it under a prefix, OpenCLIP (SD 2.x's ViT-H, SDXL's bigG) in open_clip's own names.
SD_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT = "conditioner.embedders.0.transformer."
SDXL_TEXT_2 = "conditioner.embedders.1.model."
# SD3 keeps all three text encoders in transformers' names.
SD3_TEXT = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}
SD3_PIPELINES = (
    "StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline",
    "StableDiffusion3InpaintPipeline",
)
# The pipelines this writer knows (the folder's model_index.json names them): SD/SDXL -> XL.
WRITABLE = {
    "StableDiffusionPipeline": False,
    "StableDiffusionImg2ImgPipeline": False,
    "StableDiffusionInpaintPipeline": False,
    "StableDiffusionXLPipeline": True,
    "StableDiffusionXLImg2ImgPipeline": True,
    "StableDiffusionXLInpaintPipeline": True,
}

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's pooled-text-and-size embedding; class embeddings share the LDM name.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
_VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)
_OPEN_CLIP_LAYER = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
)
_OPEN_CLIP_TOP = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}

Tensors = dict[str, "torch.Tensor"]


def original_layout(folder: Path) -> Tensors:
    """Every tensor of the pipeline in `folder`, keyed as the original single file keys it."""
    index = _model_index(folder)
    tensors: Tensors = {}
    if index in SD3_PIPELINES:
        return _sd3_layout(folder)
    xl = WRITABLE[index]
    unet_config = _config(folder / "unet")
    _add(tensors, UNET_PREFIX, _unet_keys(_load(folder / "unet"), unet_config))
    _add(tensors, VAE_PREFIX, _vae_keys(_load(folder / "vae"), _config(folder / "vae")))
    text = _load(folder / "text_encoder")
    if xl:
        _add(tensors, SDXL_TEXT, _clip_keys(text))
        _add(tensors, SDXL_TEXT_2, _open_clip_keys(_load(folder / "text_encoder_2")))
    elif _config(folder / "text_encoder").get("hidden_act") == "gelu":
        _add(tensors, SD2_TEXT, _open_clip_keys(text))  # SD 2.x's OpenCLIP ViT-H
    else:
        _add(tensors, SD_TEXT, _clip_keys(text))
    return tensors


def write_single_file(folder: Path, destination: Path) -> Path:
    """`folder` (a diffusers SD/SDXL pipeline) as one safetensors file at `destination`."""
    from safetensors.torch import save_file

    tensors = original_layout(folder)
    metadata = {"format": "pt", "converted_by": "modelkiln", "pipeline": _model_index(folder)}
    save_file(tensors, str(destination), metadata=metadata)
    return destination


def _model_index(folder: Path) -> str:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise SourceError(
            f"{folder} has no model_index.json: pass a diffusers pipeline folder (what "
            "save_pretrained writes)"
        )
    name = str(json.loads(index_file.read_text(encoding="utf-8")).get("_class_name"))
    if name not in WRITABLE and name not in SD3_PIPELINES:
        raise UnsupportedError(
            f"{folder} is a {name}; writing a single file is supported for "
            f"{', '.join(sorted([*WRITABLE, *SD3_PIPELINES]))}"
        )
    return name


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(f"{folder} has no config.json: save the pipeline again")
    return dict(json.loads(path.read_text(encoding="utf-8")))


def _load(folder: Path) -> Tensors:
    """A component's tensors as saved (sharded files merged), in their stored dtype."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SourceError(f"no safetensors weights in {folder}: save the pipeline with them")
    tensors: Tensors = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def _add(into: Tensors, prefix: str, pairs: Iterator[tuple[str, torch.Tensor]]) -> None:
    for key, tensor in pairs:
        into[prefix + key] = tensor.contiguous()


def _renamed(rest: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """Rename the leading module of `rest` (e.g. 'norm1.weight') by the first pair that
    names it."""
    for diffusers, original in pairs:
        if rest.startswith(diffusers + "."):
            return original + rest[len(diffusers) :]
    return rest


def _unet_keys(tensors: Tensors, config: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """diffusers UNet2DConditionModel -> LDM's input_blocks / middle_block / output_blocks.

    Input block 0 is conv_in; each down block then takes layers_per_block + 1 input blocks
    (its layers, then its downsampler); each up block takes layers_per_block + 1 output blocks
    with the upsampler inside the last (after the attention, if the block has one)."""
    per_block = int(config["layers_per_block"])
    attending_up = ["CrossAttn" in kind for kind in config["up_block_types"]]
    rules: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
        (
            re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"input_blocks.{_down(m, per_block)}.0.{_renamed(m[3], _RESNET)}",
        ),
        (
            re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
            lambda m: f"input_blocks.{_down(m, per_block)}.1.{m[3]}",
        ),
        (
            re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
            lambda m: f"input_blocks.{(int(m[1]) + 1) * (per_block + 1)}.0.op.{m[2]}",
        ),
        (
            re.compile(r"mid_block\.resnets\.(\d+)\.(.+)"),
            lambda m: f"middle_block.{2 * int(m[1])}.{_renamed(m[2], _RESNET)}",
        ),
        (re.compile(r"mid_block\.attentions\.0\.(.+)"), lambda m: f"middle_block.1.{m[1]}"),
        (
            re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"output_blocks.{_up(m, per_block)}.0.{_renamed(m[3], _RESNET)}",
        ),
        (
            re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
            lambda m: f"output_blocks.{_up(m, per_block)}.1.{m[3]}",
        ),
        (
            re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"),
            lambda m: (
                f"output_blocks.{int(m[1]) * (per_block + 1) + per_block}."
                f"{2 if attending_up[int(m[1])] else 1}.conv.{m[2]}"
            ),
        ),
    ]
    for key, tensor in tensors.items():
        yield _apply(key, rules, _UNET_TOP, "UNet"), tensor


def _down(match: re.Match[str], per_block: int) -> int:
    return 1 + int(match[1]) * (per_block + 1) + int(match[2])


def _up(match: re.Match[str], per_block: int) -> int:
    return int(match[1]) * (per_block + 1) + int(match[2])


def _apply(
    key: str,
    rules: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]],
    top: Mapping[str, str],
    what: str,
) -> str:
    for pattern, rename in rules:
        if match := pattern.fullmatch(key):
            return rename(match)
    module, _, leaf = key.rpartition(".")
    if module in top:
        return f"{top[module]}.{leaf}"
    raise UnsupportedError(
        f"the {what} weight '{key}' has no place in the original layout; this {what} "
        "architecture cannot be written as a single file"
    )


def _vae_keys(tensors: Tensors, config: Mapping[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """diffusers AutoencoderKL -> LDM's encoder.down / decoder.up (numbered the other way
    round), mid.block_1/2 and mid.attn_1 (whose projections are 1x1 convolutions there)."""
    last_up = len(config["up_block_types"]) - 1
    resnet = (("conv_shortcut", "nin_shortcut"),)
    rules: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
        (
            re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_renamed(m[3], resnet)}",
        ),
        (
            re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
            lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}",
        ),
        (
            re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
            lambda m: f"decoder.up.{last_up - int(m[1])}.block.{m[2]}.{_renamed(m[3], resnet)}",
        ),
        (
            re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"),
            lambda m: f"decoder.up.{last_up - int(m[1])}.upsample.conv.{m[2]}",
        ),
        (
            re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)"),
            lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_renamed(m[3], resnet)}",
        ),
        (
            re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)"),
            lambda m: f"{m[1]}.mid.attn_1.{_renamed(m[2], _VAE_ATTENTION)}",
        ),
    ]
    top = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    top |= {
        name: name
        for name in (
            "encoder.conv_in",
            "encoder.conv_out",
            "decoder.conv_in",
            "decoder.conv_out",
            "quant_conv",
            "post_quant_conv",
        )
    }
    for key, tensor in tensors.items():
        name = _apply(key, rules, top, "VAE")
        if ".mid.attn_1." in name and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original's 1x1 convolution
        yield name, tensor


def _clip_keys(tensors: Tensors) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' CLIP text model keeps its names; transformers >= 5.6 saves
    CLIPTextModel without the `text_model.` level that single files have."""
    for key, tensor in tensors.items():
        if key.endswith("position_ids"):
            continue  # a buffer transformers recreates; not a weight
        nested = key.startswith(("text_model.", "text_projection."))
        yield (key if nested else f"text_model.{key}"), tensor


def _open_clip_keys(tensors: Tensors) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' CLIP text model -> open_clip: fused q/k/v (`in_proj`), its own layer
    names, and `text_projection` as open_clip multiplies by it (transposed)."""
    import torch

    tensors = {
        (k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"): v
        for k, v in tensors.items()
        if not k.endswith("position_ids")
    }
    layer = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key in _OPEN_CLIP_TOP:
            yield _OPEN_CLIP_TOP[key], tensor
        elif key == "text_projection.weight":
            yield "text_projection", tensor.T
        elif match := layer.fullmatch(key):
            index, rest = match[1], match[2]
            if projection := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                name = f"transformer.resblocks.{index}.attn.in_proj_{projection[2]}"
                fused.setdefault(name, {})[projection[1]] = tensor
            else:
                yield f"transformer.resblocks.{index}.{_renamed(rest, _OPEN_CLIP_LAYER)}", tensor
        else:
            raise UnsupportedError(
                f"the text encoder weight '{key}' has no place in open_clip's layout"
            )
    for name, parts in fused.items():
        yield name, torch.cat([parts["q"], parts["k"], parts["v"]])


def _sd3_layout(folder: Path) -> Tensors:
    """SD3's single file: the MMDiT as `model.diffusion_model.joint_blocks.*`, the VAE as
    LDM's, and the text encoders (those the pipeline has) under `text_encoders.*`."""
    tensors: Tensors = {}
    _add(tensors, UNET_PREFIX, _mmdit_keys(_load(folder / "transformer")))
    _add(tensors, VAE_PREFIX, _vae_keys(_load(folder / "vae"), _config(folder / "vae")))
    for component, prefix in SD3_TEXT.items():
        if (folder / component).is_dir():
            weights = _load(folder / component)
            if component == "text_encoder":
                weights = _without_identity_projection(weights, folder)
            pairs = weights.items() if component == "text_encoder_3" else _clip_keys(weights)
            _add(tensors, prefix, iter(pairs))
    return tensors


def _without_identity_projection(weights: Tensors, folder: Path) -> Tensors:
    """SD3 uses CLIP-L's pooled output unprojected: its single file has no projection, and
    diffusers loads it back as the identity. A pipeline whose CLIP-L projection is anything
    else cannot be written without changing it."""
    import torch

    projection = weights.get("text_projection.weight")
    if projection is None:
        return weights
    if projection.ndim != 2 or not torch.equal(projection, torch.eye(*projection.shape)):
        raise UnsupportedError(
            f"{folder}/text_encoder's text_projection is not the identity, and SD3's single "
            "file has no place for another (diffusers reads it back as the identity)"
        )
    return {k: v for k, v in weights.items() if k != "text_projection.weight"}


# diffusers' MMDiT module -> the original's, for everything but the fused q/k/v projections.
_MMDIT_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_MMDIT_BLOCK = (
    ("attn.norm_q", "x_block.attn.ln_q"),
    ("attn.norm_k", "x_block.attn.ln_k"),
    ("attn.norm_added_q", "context_block.attn.ln_q"),
    ("attn.norm_added_k", "context_block.attn.ln_k"),
    ("attn.to_out.0", "x_block.attn.proj"),
    ("attn.to_add_out", "context_block.attn.proj"),
    ("attn2.norm_q", "x_block.attn2.ln_q"),
    ("attn2.norm_k", "x_block.attn2.ln_k"),
    ("attn2.to_out.0", "x_block.attn2.proj"),
    ("norm1.linear", "x_block.adaLN_modulation.1"),
    ("norm1_context.linear", "context_block.adaLN_modulation.1"),
    ("ff.net.0.proj", "x_block.mlp.fc1"),
    ("ff.net.2", "x_block.mlp.fc2"),
    ("ff_context.net.0.proj", "context_block.mlp.fc1"),
    ("ff_context.net.2", "context_block.mlp.fc2"),
)
# Projections the original keeps fused as one qkv: (diffusers q, k, v) -> original.
_MMDIT_QKV = (
    (("attn.to_q", "attn.to_k", "attn.to_v"), "x_block.attn.qkv"),
    (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "context_block.attn.qkv"),
    (("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.qkv"),
)


def _mmdit_keys(tensors: Tensors) -> Iterator[tuple[str, torch.Tensor]]:
    """diffusers SD3Transformer2DModel -> SD3's MMDiT: q/k/v fused, and the scale/shift halves
    of the final modulations (the last block's context one and norm_out) in the original's
    order (diffusers swaps them when it loads)."""
    import torch

    last = max(int(k.split(".")[1]) for k in tensors if k.startswith("transformer_blocks."))
    block = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)")
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key == "pos_embed.pos_embed":
            yield "pos_embed", tensor
            continue
        if match := block.fullmatch(key):
            index, module, leaf = int(match[1]), match[2], match[3]
            qkv = next(((m, o) for m, o in _MMDIT_QKV if module in m), None)
            if qkv is not None:
                name = f"joint_blocks.{index}.{qkv[1]}.{leaf}"
                fused.setdefault(name, {})[module] = tensor
                continue
            original = dict(_MMDIT_BLOCK).get(module)
            if original is None:
                raise UnsupportedError(
                    f"the transformer weight '{key}' has no place in SD3's layout"
                )
            if index == last and module == "norm1_context.linear":
                tensor = _swap_halves(tensor)
            yield f"joint_blocks.{index}.{original}.{leaf}", tensor
            continue
        module, _, leaf = key.rpartition(".")
        if module not in _MMDIT_TOP:
            raise UnsupportedError(f"the transformer weight '{key}' has no place in SD3's layout")
        yield (
            f"{_MMDIT_TOP[module]}.{leaf}",
            _swap_halves(tensor) if module == "norm_out.linear" else tensor,
        )
    for name, parts in fused.items():
        order = next(m for m, o in _MMDIT_QKV if name.split(".", 2)[2].startswith(o))
        yield name, torch.cat([parts[m] for m in order])


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift): diffusers' swap_scale_shift, its own inverse."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])
