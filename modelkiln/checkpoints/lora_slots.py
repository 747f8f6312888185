"""A LoRA read as the matrices a run-time LoRA slot takes (diffusion/lora.py).

An adapter file (kiln lora-adapter) is read torch-free. diffusers reads a LoRA file as it
does for `load_lora_weights`: `lora_state_dict` turns kohya /
A1111 and older diffusers layouts into its own, `convert_unet_state_dict_to_peft` into
`<layer>.lora_A/B.weight`, and loading the adapter into the UNet built on the meta device
(no weights) gives each layer's alpha / rank scaling as peft computes it: that needs torch
and diffusers, which this module imports only then.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.checkpoints.lora import lora_layout, peft_state_dict
from modelkiln.diffusion.lora import (
    ADAPTER_SUFFIX,
    LoraMatrices,
    read_adapter,
    slot_feeds,
    slot_layers,
    write_adapter,
)
from modelkiln.errors import (
    ArtifactError,
    BackendUnavailableError,
    SourceError,
    UnsupportedError,
    first_line,
)
from modelkiln.profiles import LoraSettings

ADAPTER = "kiln_runtime_lora"


def read_lora(path: Path, unet_config: Mapping[str, Any]) -> LoraMatrices:
    """An adapter file as it is (torch-free); a LoRA .safetensors file or peft folder read
    by diffusers for the UNet `unet_config` describes (torch and diffusers needed)."""
    if path.suffix == ADAPTER_SUFFIX:
        return read_adapter(path)
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        raise BackendUnavailableError(
            f"reading LoRA {path} needs torch and diffusers ({first_line(error)}); without "
            "them, convert it where they are installed: kiln lora-adapter ARTIFACT LORA -o "
            f"LORA{ADAPTER_SUFFIX}, and pass that file"
        ) from error
    return lora_matrices(path, unet_config)


def lora_matrices(path: Path, unet_config: Mapping[str, Any]) -> LoraMatrices:
    """The UNet part of the LoRA at `path` (a .safetensors file or a peft folder) as
    layer -> (A, B * alpha / rank), for the UNet `unet_config` describes."""
    if lora_layout(Path(path).expanduser()) == "peft":
        state, alphas = peft_state_dict(Path(path), "unet"), None
    else:
        state, alphas = _diffusers_state_dict(Path(path))
    others = sorted({key.split(".", 1)[0] for key in state} - {"unet"})
    if others:
        raise UnsupportedError(
            f"LoRA {path} also adapts {', '.join(others)}; run-time LoRA slots are in the UNet "
            "only: fuse this LoRA at build (kiln build --lora) to apply all of it"
        )
    unet = _unet_with_adapter(unet_config, state, alphas, path)
    return LoraMatrices(str(path), _layers(unet, state))


def write_artifact_adapter(artifact: Path, loras: Sequence[LoraSettings], output: Path) -> Path:
    """LoRAs at their scales as one ONNX Runtime adapter file for `artifact`'s UNet slots."""
    from modelkiln.jsonfile import read_json_object
    from modelkiln.loading import open_artifact

    opened = open_artifact(artifact)
    record = opened.manifest.components.get("unet")
    slots = slot_layers(record.inputs) if record is not None else {}
    if record is None or not slots:
        raise UnsupportedError(
            f"{artifact} has no UNet with run-time LoRA slots; build it with --set "
            "runtime_lora.enabled=true (SD 1.x/2.x, SDXL on ONNX Runtime)"
        )
    config = read_json_object(
        opened.root / Path(record.entry).parent / "config.json", ArtifactError, fix="rebuild it"
    )
    matrices = [(read_lora(Path(lora.path), config), lora.scale) for lora in loras]
    return write_adapter(slot_feeds(slots, matrices), output)


def _diffusers_state_dict(path: Path) -> tuple[dict[str, Any], dict[str, float] | None]:
    from diffusers import StableDiffusionPipeline

    from modelkiln.quiet import quiet_libraries

    try:
        with quiet_libraries():
            state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    except Exception as error:  # diffusers raises many types for a foreign file
        raise SourceError(
            f"LoRA {path} is not a LoRA diffusers reads ({first_line(error)})"
        ) from error
    return dict(state), alphas


def _unet_with_adapter(
    unet_config: Mapping[str, Any],
    state: dict[str, Any],
    alphas: dict[str, float] | None,
    path: Path,
) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    from modelkiln.quiet import quiet_libraries

    with torch.device("meta"), quiet_libraries(), warnings.catch_warnings():
        # Loading values into meta layers warns that it is a no-op: the values are read
        # from the state dict itself; only the layers and their scaling are wanted here.
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_config(dict(unet_config))
        try:
            unet.load_lora_adapter(
                dict(state), prefix="unet", network_alphas=alphas, adapter_name=ADAPTER
            )
        except Exception as error:  # peft and diffusers raise many types
            raise SourceError(
                f"LoRA {path} does not fit this UNet ({first_line(error)}); is it a LoRA for "
                "this architecture?"
            ) from error
    return unet


def _layers(unet: Any, state: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each adapted layer's A and B * scaling, the values read from the converted state."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.tuners.lora import LoraLayer

    own = {k.removeprefix("unet."): v for k, v in state.items()}
    if not any(".lora_A." in key for key in own):
        own = convert_unet_state_dict_to_peft(own)
    layers = {}
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        down = own[f"{name}.lora_A.weight"].float().numpy()
        up = own[f"{name}.lora_B.weight"].float().numpy()
        if down.ndim != 2:
            raise UnsupportedError(
                f"layer {name} is a convolution LoRA (LoCon); run-time slots adapt Linear "
                "layers: fuse this LoRA at build (kiln build --lora)"
            )
        scaling = float(module.scaling[ADAPTER])
        layers[name] = (down.astype(np.float32), (up * scaling).astype(np.float32))
    if not layers:
        raise SourceError("the LoRA's UNet part adapts no layer of this UNet")
    return layers
