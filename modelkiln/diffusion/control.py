"""ControlNet in the denoising loop, torch-free: the control image prepared as diffusers'
ControlNet pipelines prepare it, and a denoiser that runs the ControlNets, scales their
residuals, sums them (diffusers' MultiControlNetModel) and feeds them to the UNet."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np

from modelkiln.diffusion.denoise import Conditioning, Denoiser, run_conformed
from modelkiln.diffusion.images import resized

if TYPE_CHECKING:
    from PIL import Image

    from modelkiln.runtimes import Session

CONTROLNET = "controlnet"  # a ControlNet pipeline's folder, component and session
DOWN_RESIDUAL = "down_block_additional_residual_"
MID_RESIDUAL = "mid_block_additional_residual"
MID_RESIDUAL_OUT = "mid_block_res_sample"


def control_to_pixels(image: Image.Image, height: int, width: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [0, 1]: RGB, resized with Lanczos, not normalised
    (diffusers' control_image_processor: VaeImageProcessor with do_normalize=False)."""
    array = np.asarray(resized(image.convert("RGB"), height, width), dtype=np.float32) / 255.0
    return array.transpose(2, 0, 1)[None].astype(np.float32)


def is_controlnet(name: str) -> bool:
    """controlnet, or controlnet_N: one of a MultiControlNetModel's nets."""
    number = name.removeprefix(f"{CONTROLNET}_")
    return name == CONTROLNET or (number != name and number.isdigit())


def controlnet_names(names: Collection[str]) -> list[str]:
    """The ControlNets among `names`, in order: controlnet, controlnet_1, controlnet_2, ...
    (how diffusers saves a MultiControlNetModel)."""
    found: list[str] = []
    while (name := CONTROLNET if not found else f"{CONTROLNET}_{len(found)}") in names:
        found.append(name)
    return found


def controlled_denoiser(
    controlnets: Sequence[Session],
    unet: Session,
    controls: Sequence[np.ndarray],
    scales: Sequence[float],
) -> Denoiser:
    """The UNet with the sum of each ControlNet's residuals times its scale (one control image
    per ControlNet); without control images, zero residuals: the plain UNet (no ControlNet
    runs)."""
    names = [n for n in unet.input_specs if n.startswith(DOWN_RESIDUAL)]
    names = [*sorted(names, key=lambda n: int(n.removeprefix(DOWN_RESIDUAL))), MID_RESIDUAL]
    produced = [*(f"down_block_res_sample_{i}" for i in range(len(names) - 1)), MID_RESIDUAL_OUT]

    def predict(sample: np.ndarray, timestep: float, conditioning: Conditioning) -> np.ndarray:
        inputs = {
            "sample": sample,
            "timestep": np.asarray(timestep),
            "encoder_hidden_states": conditioning.encoder_hidden_states,
        }
        count = len(sample)
        residuals = [_zeros(unet, name, count) for name in names]
        for controlnet, control, scale in zip(controlnets, controls, scales, strict=True):
            # SDXL's ControlNet also reads the pooled text embeddings and size ids.
            added = {k: v for k, v in conditioning.extra.items() if k in controlnet.input_specs}
            feeds = {**inputs, **added, "controlnet_cond": np.repeat(control, count, axis=0)}
            out = run_conformed(controlnet, feeds)
            for index, name in enumerate(produced):
                residuals[index] += out[name] * np.float32(scale)
        feeds = {**inputs, **dict(zip(names, residuals, strict=True)), **conditioning.extra}
        return run_conformed(unet, feeds)["out_sample"]

    return predict


def _zeros(unet: Session, name: str, batch: int) -> np.ndarray:
    _, *rest = unet.input_specs[name].shape
    return np.zeros((batch, *(int(d) for d in rest)), np.float32)
