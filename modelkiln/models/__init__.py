"""Model families by name, and detection of which one a source belongs to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelkiln.errors import UnsupportedError
from modelkiln.models.base import LoadedModel, ModelFamily
from modelkiln.registry import Registry

if TYPE_CHECKING:
    from modelkiln.sources import ResolvedSource

FAMILIES: Registry[type[ModelFamily]] = Registry(
    "model family",
    {
        "vit": "modelkiln.models.vit:ViTFamily",
        "sd": "modelkiln.models.stable_diffusion:StableDiffusionFamily",
        "sdxl": "modelkiln.models.stable_diffusion:StableDiffusionXLFamily",
        "sd3": "modelkiln.models.diffusion_transformers:StableDiffusion3Family",
        "flux": "modelkiln.models.diffusion_transformers:FluxFamily",
    },
)


def detect_family(source: ResolvedSource) -> type[ModelFamily]:
    for name in FAMILIES:
        family = FAMILIES.get(name)
        if family.matches(source):
            return family
    supported = "; ".join(f"{n}: {FAMILIES.get(n).summary}" for n in FAMILIES)
    raise UnsupportedError(
        f"{source.spec}: {_what_is_there(source)}, which modelkiln does not support; "
        f"supported: {supported}"
    )


def _what_is_there(source: ResolvedSource) -> str:
    """Describe the source in the words of its own config files."""
    if (index := source.read_json("model_index.json")) is not None:
        return f"found a diffusers pipeline ({index.get('_class_name', 'unknown class')})"
    config = source.read_json("config.json")
    if config is None:
        return "found no config.json"
    if "model_type" in config:
        architectures = ", ".join(config.get("architectures") or []) or "no architectures"
        return f"found a transformers model_type '{config['model_type']}' ({architectures})"
    if "architecture" in config:
        return f"found a timm architecture '{config['architecture']}'"
    return "found a config.json with neither model_type nor architecture"


__all__ = ["FAMILIES", "LoadedModel", "ModelFamily", "detect_family"]
