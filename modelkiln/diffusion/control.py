"""ControlNet in the denoising loop, torch-free: the control image prepared as diffusers'
ControlNet pipelines prepare it, and a denoiser that runs the ControlNet, scales its residuals
and feeds them to the UNet."""

from __future__ import annotations

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


def control_to_pixels(image: Image.Image, height: int, width: int) -> np.ndarray:
    """(1, 3, height, width) float32 in [0, 1]: RGB, resized with Lanczos, not normalised
    (diffusers' control_image_processor: VaeImageProcessor with do_normalize=False)."""
    array = np.asarray(resized(image.convert("RGB"), height, width), dtype=np.float32) / 255.0
    return array.transpose(2, 0, 1)[None].astype(np.float32)


def controlled_denoiser(
    controlnet: Session, unet: Session, control: np.ndarray | None, scale: float
) -> Denoiser:
    """The UNet with a ControlNet's residuals, times `scale`; without a control image, zero
    residuals: the plain UNet (the ControlNet is not run)."""
    names = [n for n in unet.input_specs if n.startswith(DOWN_RESIDUAL)]
    names = [*sorted(names, key=lambda n: int(n.removeprefix(DOWN_RESIDUAL))), MID_RESIDUAL]

    def predict(sample: np.ndarray, timestep: float, conditioning: Conditioning) -> np.ndarray:
        inputs = {
            "sample": sample,
            "timestep": np.asarray(timestep),
            "encoder_hidden_states": conditioning.encoder_hidden_states,
        }
        count = len(sample)
        if control is None:
            residuals = [_zeros(unet, name, count) for name in names]
        else:
            # SDXL's ControlNet also reads the pooled text embeddings and size ids.
            added = {k: v for k, v in conditioning.extra.items() if k in controlnet.input_specs}
            feeds = {**inputs, **added, "controlnet_cond": np.repeat(control, count, axis=0)}
            out = run_conformed(controlnet, feeds)
            produced = [f"down_block_res_sample_{i}" for i in range(len(names) - 1)]
            residuals = [
                out[name] * np.float32(scale) for name in [*produced, "mid_block_res_sample"]
            ]
        feeds = {**inputs, **dict(zip(names, residuals, strict=True)), **conditioning.extra}
        return run_conformed(unet, feeds)["out_sample"]

    return predict


def _zeros(unet: Session, name: str, batch: int) -> np.ndarray:
    _, *rest = unet.input_specs[name].shape
    return np.zeros((batch, *(int(d) for d in rest)), np.float32)
