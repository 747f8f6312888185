"""Torch side of the Stable Diffusion families: loading components and their export wrappers.

Every wrapper keeps the diffusers / transformers model as `self.model`, so the exported graph's
initializer names are "model." + the checkpoint's own keys: the ONNX exporter can stream the
weights straight from the source safetensors instead of holding a second copy in memory.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from modelkiln.diffusion.control import is_controlnet
from modelkiln.errors import SourceError, first_line


def component_class(directory: Path) -> Any:
    """The diffusers / transformers class a component directory was saved from."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if "_class_name" in config:
        return getattr(importlib.import_module("diffusers"), config["_class_name"])
    architecture = (config.get("architectures") or ["CLIPTextModel"])[0]
    return getattr(importlib.import_module("transformers"), architecture)


def load_component(directory: Path, *, pickle: bool) -> Any:
    """The fp32 torch model saved in `directory` (config.json + weights)."""
    from modelkiln.quiet import quiet_libraries

    model_class = component_class(directory)
    kwargs: dict[str, Any] = {"use_safetensors": not pickle}
    kwargs["torch_dtype" if model_class.__module__.startswith("diffusers") else "dtype"] = (
        torch.float32
    )
    if _needs_eager_attention(model_class):
        kwargs["attn_implementation"] = "eager"
    try:
        with quiet_libraries():
            model = model_class.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        raise SourceError(
            f"cannot load {model_class.__name__} from {directory}: {first_line(error)}"
        ) from error
    return model.eval()


def meta_component(directory: Path) -> Any:
    """The same model built on the meta device: its graph without a byte of weights."""
    model_class = component_class(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):  # diffusers
            return model_class.from_config(config).eval()
        config_class = model_class.config_class
        model_config = config_class.from_dict(config)
        if _needs_eager_attention(model_class):
            model_config._attn_implementation = "eager"
        return model_class(model_config).eval()


def _needs_eager_attention(model_class: Any) -> bool:
    """T5's SDPA attention does not export (a view of its attention output fails in
    torch.export, modeling_t5.py); its eager attention computes the same and does."""
    return bool(model_class.__name__.startswith("T5"))


class TextEncoder(nn.Module):
    """input_ids -> last_hidden_state, pooler_output [, hidden_states.0..L] (optimum's order)."""

    def __init__(self, model: nn.Module, hidden_states: bool) -> None:
        super().__init__()
        self.model = model
        self.hidden_states = hidden_states

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, output_hidden_states=self.hidden_states)
        results = [out.last_hidden_state, out.pooler_output]
        return tuple(results + list(out.hidden_states or ()))


class TextEncoderWithProjection(nn.Module):
    """input_ids -> text_embeds, last_hidden_state, hidden_states.0..L (SDXL's text_encoder_2)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, output_hidden_states=True)
        return (out.text_embeds, out.last_hidden_state, *out.hidden_states)


class UNet(nn.Module):
    """sample, timestep, encoder_hidden_states -> out_sample [, deep_features].

    `deep_features` (DeepCache, models/deep_cache.py): also the output of the last up block's
    first layer, which the shallow UNet takes back; a forward hook keeps it, so diffusers'
    forward runs unchanged."""

    model: Any  # diffusers UNet2DConditionModel

    def __init__(self, model: nn.Module, deep_features: bool = False) -> None:
        super().__init__()
        self.model = model
        self._kept: list[torch.Tensor] | None = None
        if deep_features:
            self._kept = []
            last = self.model.up_blocks[-1]
            attentions = getattr(last, "attentions", None)
            first_layer = attentions[0] if attentions is not None else last.resnets[0]
            first_layer.register_forward_hook(self._keep)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return self._outputs(self.model(sample, timestep, encoder_hidden_states, return_dict=False))

    def _keep(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        assert self._kept is not None  # registered only when keeping
        # A transformer returns a tuple (return_dict=False), a resnet its tensor.
        self._kept.append(output[0] if isinstance(output, tuple) else output)

    def _outputs(self, result: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if self._kept is None:
            return (result[0],)
        try:
            return (result[0], self._kept[-1])
        finally:
            self._kept.clear()


class ControlledUNet(nn.Module):
    """sample, timestep, encoder_hidden_states [, text_embeds, time_ids: SDXL], then a
    ControlNet's residuals (down blocks', then the mid block's) -> out_sample. Zero
    residuals: the plain UNet."""

    def __init__(self, model: nn.Module, xl: bool) -> None:
        super().__init__()
        self.model = model
        self.xl = xl

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *rest: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        conditions, residuals = _added_conditions(rest, self.xl)
        result = self.model(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs=conditions,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )
        return (result[0],)


class ControlNet(nn.Module):
    """sample, timestep, encoder_hidden_states [, text_embeds, time_ids: SDXL],
    controlnet_cond -> the down blocks' residuals and the mid block's, at conditioning scale
    1 (the pipeline scales them)."""

    def __init__(self, model: nn.Module, xl: bool) -> None:
        super().__init__()
        self.model = model
        self.xl = xl

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *rest: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        conditions, (controlnet_cond,) = _added_conditions(rest, self.xl)
        down, mid = self.model(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale=1.0,
            added_cond_kwargs=conditions,
            return_dict=False,
        )
        return (*down, mid)


def _added_conditions(
    inputs: tuple[torch.Tensor, ...], xl: bool
) -> tuple[dict[str, torch.Tensor] | None, tuple[torch.Tensor, ...]]:
    """SDXL's text_embeds and time_ids from the front of `inputs`, and the rest."""
    if not xl:
        return None, inputs
    text_embeds, time_ids, *rest = inputs
    return {"text_embeds": text_embeds, "time_ids": time_ids}, tuple(rest)


class UNetXL(UNet):
    """SDXL's UNet: also the pooled text_embeds and the six time_ids."""

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        conditions = {"text_embeds": text_embeds, "time_ids": time_ids}
        result = self.model(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=conditions, return_dict=False
        )
        return self._outputs(result)


class VaeEncoder(nn.Module):
    model: Any  # diffusers AutoencoderKL

    """sample (pixels in [-1, 1]) -> latent_parameters (mean and logvar, as optimum exports)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.encode(sample).latent_dist.parameters,)


class VaeDecoder(nn.Module):
    model: Any  # diffusers AutoencoderKL

    """latent_sample (already divided by scaling_factor) -> sample (pixels in [-1, 1])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent_sample: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.decode(latent_sample, return_dict=False)[0],)


class T5Encoder(nn.Module):
    """input_ids -> last_hidden_state (SD3's text_encoder_3, Flux's text_encoder_2)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(input_ids=input_ids).last_hidden_state,)


class SD3Transformer(nn.Module):
    """SD3's MMDiT: hidden_states (latents), timestep (one per batch item),
    encoder_hidden_states (CLIP and T5 tokens), pooled_projections (both CLIPs' pooled
    embeddings) -> out_hidden_states (the velocity), in optimum's order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        result = self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )
        return (result[0],)


class FluxTransformer(nn.Module):
    """Flux's transformer on packed latents (batch, image tokens, 64): the text and image
    tokens' positions (txt_ids, img_ids) and, for guidance-distilled models (dev), the
    guidance scale; timestep in [0, 1]. Optimum's order of inputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor]:
        result = self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )
        return (result[0],)


def wrap(
    component: str,
    model: nn.Module,
    family: str,
    text_kind: str | None,
    *,
    controlled: bool = False,
    deep_cache: bool = False,
    block_cache: bool = False,
    token_merging: float = 0.0,
) -> nn.Module:
    """The export wrapper of one component of a `family` (sd, sdxl, sd3, flux) pipeline;
    `text_kind`: how a text encoder exports (diffusion_signatures.TEXT_ENCODERS), else None;
    `controlled`: the UNet also takes a ControlNet's residuals; `deep_cache`: the UNet also
    outputs its deep features (models/deep_cache.py), which unet_shallow takes;
    `block_cache`: the transformer also outputs the residuals transformer_head takes
    (models/first_block_cache.py); `token_merging`: the UNet's (and shallow UNet's) ratio of
    merged self-attention tokens (models/unet_token_merging.py). Denoisers' GEGLUs export
    as two matmuls (models/geglu_split.py)."""
    from modelkiln.models import deep_cache as caching
    from modelkiln.models import first_block_cache as blocks
    from modelkiln.models.geglu_split import split_geglu_projections
    from modelkiln.models.unet_token_merging import merge_unet_tokens

    if component in ("unet", caching.SHALLOW_UNET):
        model = merge_unet_tokens(model, token_merging)
    if component in ("unet", caching.SHALLOW_UNET) or is_controlnet(component):
        model = split_geglu_projections(model)

    if text_kind == "t5":
        return T5Encoder(model).eval()
    if text_kind == "clip-projection":
        return TextEncoderWithProjection(model).eval()
    if text_kind is not None:
        return TextEncoder(model, hidden_states=text_kind == "clip-hidden-states").eval()
    if is_controlnet(component):
        return ControlNet(model, xl=family == "sdxl").eval()
    if component == "unet" and controlled:
        return ControlledUNet(model, xl=family == "sdxl").eval()
    if component == caching.SHALLOW_UNET:
        return caching.shallow_unet(model, xl=family == "sdxl").eval()
    if component == "unet":
        return (UNetXL if family == "sdxl" else UNet)(model, deep_features=deep_cache).eval()
    if component in ("transformer", blocks.TRANSFORMER_HEAD):
        wrapper = FluxTransformer(model) if family == "flux" else SD3Transformer(model)
        patch = None if family == "flux" else int(cast(Any, model).config.patch_size)
        if component == blocks.TRANSFORMER_HEAD:
            return blocks.transformer_head(wrapper, patch).eval()
        return (blocks.CachingTransformer(wrapper, patch) if block_cache else wrapper).eval()
    if component == "vae_encoder":
        return VaeEncoder(model).eval()
    if component == "vae_decoder":
        return VaeDecoder(model).eval()
    raise ValueError(f"no {family} component '{component}'")  # a bug, not input


def lora_slot_layers(model: nn.Module, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """The Linear layers named by `targets` (a whole name or its last parts) -> (in, out)."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(name == target or name.endswith("." + target) for target in targets)
    }


class LoraSlots(nn.Module):
    """A wrapper's inputs, then A and B of each slot layer: each slot layer's output gains
    x @ A.T @ B.T, a LoRA (with its scale in B) chosen at run time. Forward hooks add it, so
    the weights keep their names ("model." + checkpoint key) for the streamed export."""

    wrapper: nn.Module
    model: nn.Module

    def __init__(self, wrapper: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.model = cast(nn.Module, wrapper.model)
        object.__setattr__(self, "wrapper", wrapper)  # not a submodule: one name per weight
        self.layers = list(layers)
        self.matrices: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        modules = dict(self.model.named_modules())
        for name in self.layers:
            modules[name].register_forward_hook(self._adds_lora(name))

    def forward(self, *inputs: torch.Tensor) -> Any:
        count = len(inputs) - 2 * len(self.layers)
        base, matrices = inputs[:count], inputs[count:]
        self.matrices = {
            name: (matrices[2 * i], matrices[2 * i + 1]) for i, name in enumerate(self.layers)
        }
        try:
            return self.wrapper(*base)
        finally:
            self.matrices = {}

    def _adds_lora(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> Any:
            down, up = self.matrices[name]
            return output + nn.functional.linear(nn.functional.linear(args[0], down), up)

        return hook
