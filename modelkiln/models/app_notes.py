"""What an app that runs a bundle's component files itself does around them: the families'
part of a bundle's README (ModelFamily.app_notes), written from kiln.json and the bundle's
file list. modelkiln's numpy pipelines do the same and are the reference implementation.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from modelkiln.diffusion.forecast import MIN_WARMUP
from modelkiln.records import Manifest

REFERENCE = (
    "modelkiln's numpy pipeline (`modelkiln.load(bundle)`, no torch) is the reference "
    "implementation."
)


def listed(files: Collection[str], folder: str) -> str:
    """The bundle's files in folder, as `a`, `b` (names inside the folder)."""
    names = sorted(name.removeprefix(folder) for name in files if name.startswith(folder))
    return ", ".join(f"`{name}`" for name in names)


def _size(size: Any) -> str:
    """A preprocessing size, (height, width) or one number, as H×W."""
    if isinstance(size, (list, tuple)):
        return "×".join(str(n) for n in size)
    return f"{size}×{size}"


def preprocessing_steps(recipe: Mapping[str, Any]) -> list[str]:
    """kiln.json's model_info.preprocessing (preprocess.ImagePreprocessor.to_dict) in words."""
    mode, size = recipe.get("resize_mode"), recipe.get("size")
    how = f" ({recipe.get('interpolation', 'bilinear')})"
    resize = {
        "exact": f"resize to {_size(size)}{how}",
        "shortest_edge": f"resize the shorter side to {size}{how}",
        "cover": f"resize, keeping the aspect ratio, to cover {_size(size)}{how}",
        "contain": f"resize, keeping the aspect ratio, to fit in {_size(size)}{how}",
    }
    steps = [resize[mode]] if mode in resize else []
    if recipe.get("crop_size"):
        steps.append(f"center-crop {_size(recipe['crop_size'])}")
    factor = float(recipe.get("rescale_factor", 1.0))
    scale = "1/255" if math.isclose(factor, 1 / 255) else f"{factor:g}"
    steps.append(f"multiply the 0-255 RGB values by {scale}")
    steps.append(f"subtract the mean {list(recipe['mean'])} and divide by the std ")
    steps[-1] += f"{list(recipe['std'])} per channel"
    return steps


def vision_notes(manifest: Manifest, files: Collection[str]) -> str:
    """ViT: the preprocessing that makes `pixel_values`, and what the outputs index."""
    recipe = manifest.model_info.get("preprocessing")
    if not recipe:
        return ""
    source = (
        "`preprocessor_config.json` describes it (kiln.json's `model_info.preprocessing` is "
        "the same recipe)"
        if "preprocessor_config.json" in files
        else "kiln.json's `model_info.preprocessing` records it"
    )
    lines = [
        "### Around the program: preprocessing",
        "",
        f"`pixel_values` is made from RGB images as {source}: "
        f"{'; '.join(preprocessing_steps(recipe))}; float32, channels first (batch, 3, "
        "height, width).",
    ]
    if manifest.model_info.get("labels"):
        lines += [
            "",
            "`logits` index kiln.json's `model_info.labels` (and `config.json`'s `id2label`).",
        ]
    tokenizer = listed(files, "tokenizer/")
    if tokenizer:
        lines += [
            "",
            f"The text tower's `input_ids` come from the tokenizer in `tokenizer/` ({tokenizer}).",
        ]
    lines += ["", REFERENCE, ""]
    return "\n".join(lines)


def diffusion_notes(manifest: Manifest, files: Collection[str]) -> str:
    """SD 1.x/2.x and SDXL: tokenizing, guidance, the scheduler and decoding around the
    text encoder(s), UNet and VAE."""
    components = manifest.components
    if "unet" not in components or "vae_decoder" not in components:
        return ""
    info = manifest.model_info
    encoders = [name for name in ("text_encoder", "text_encoder_2") if name in components]
    tokenizers = [
        f"`{folder}` ({listed(files, folder)}) for `{encoder}`"
        for folder, encoder in zip(("tokenizer/", "tokenizer_2/"), encoders, strict=False)
    ]
    if len(encoders) > 1:
        encoded = (
            "their penultimate hidden states side by side are the UNet's `encoder_hidden_states`"
        )
        if info.get("force_zeros_for_empty_prompt"):
            encoded += " (zeros for the negative side when there is no negative prompt)"
    else:
        encoded = "its `last_hidden_state` is the UNet's `encoder_hidden_states`"
    scale = int(info.get("vae_scale_factor", 8))
    latents = ["images", info.get("latent_channels", 4)]
    latents += [int(info.get(side, 0)) // scale for side in ("height", "width")]
    unet = components["unet"]
    steps = [
        '1. Tokenize the prompt and a negative prompt ("" by default) with CLIP\'s BPE '
        f"tokenizer: {'; '.join(tokenizers)}. Start and end tokens, truncated and padded to "
        f"{info.get('sequence_length', 77)} ids: the encoder's `input_ids`.",
        f"2. Run the text encoder{'s' if len(encoders) > 1 else ''}: {encoded}. With "
        "classifier-free guidance (scale > 1) each UNet call takes the negative and the "
        "positive conditioning stacked in one batch (2 × images), and its prediction is "
        "negative + scale × (positive − negative).",
        "3. Run the scheduler `scheduler/scheduler_config.json` configures (its class, betas, "
        "timestep spacing and prediction type): start from Gaussian noise "
        f"[{', '.join(map(str, latents))}] times its initial sigma; at each timestep scale "
        f"the UNet's input, run `unet` ({', '.join(unet.inputs)}) and step.",
        "4. Divide the latents by `scaling_factor` "
        f"({info.get('scaling_factor')}, in `vae_decoder/config.json`) and run `vae_decoder`: "
        "its output is in [-1, 1]; pixels are (output / 2 + 0.5) clipped to [0, 1], × 255.",
    ]
    notes = []
    extra = [n for n in unet.inputs if n not in ("sample", "timestep", "encoder_hidden_states")]
    if extra:
        notes.append(
            f"The UNet's {', '.join(f'`{name}`' for name in extra)} (SDXL's pooled text "
            "embedding and size ids) are built as the reference builds them."
        )
    if info.get("unet_in_channels") == 9:
        notes.append(
            "An inpainting UNet's `sample` stacks the latents, the mask and the masked "
            "image's latents (9 channels)."
        )
    if "vae_encoder" in components:
        notes.append(
            "`vae_encoder` (image-to-image, inpainting) takes pixels in [-1, 1] and returns the "
            "latents' mean and log-variance as channel halves: latents = (mean + exp(logvar / "
            "2) × noise) × `scaling_factor`."
        )
    interval = (info.get("approximations") or {}).get("deep_cache")
    if "unet_shallow" in components and interval:
        notes.append(
            f"DeepCache: run `unet` on one step in {interval} and keep its `deep_features`; on "
            "the steps between run `unet_shallow` on the same inputs plus the kept features "
            "(run `unet` again when the batch changes). Running `unet` every step is the exact "
            "pipeline."
        )
    forecast = info.get("approximations") or {}
    if forecast.get("taylorseer_interval"):
        notes.append(
            "TaylorSeer (validated so): after the first "
            f"{max(forecast['taylorseer_warmup'], MIN_WARMUP)} steps run `unet` on the last of "
            f"each {forecast['taylorseer_interval']} steps and on the last "
            f"{forecast['taylorseer_cooldown']}; on the others use the last output plus "
            f"{_forecast_terms(int(forecast.get('taylorseer_order', 1)))}, s being the steps "
            "since the last computed one. Running `unet` every step is the exact pipeline."
        )
    others = sorted(
        set(components) - {"unet", "unet_shallow", "vae_decoder", "vae_encoder", *encoders}
    )
    if others:
        notes.append(f"For {', '.join(f'`{name}`' for name in others)} see the reference.")
    lines = [
        "### Around the programs: the diffusion pipeline",
        "",
        "The programs are the pipeline's networks; an app also does what diffusers' pipeline "
        f"does around them. {REFERENCE}",
        "",
        *steps,
        "",
        *([" ".join(notes), ""] if notes else []),
    ]
    return "\n".join(lines)


def _forecast_terms(order: int) -> str:
    """TaylorSeer's forecast in words: its derivatives and their Taylor terms."""
    if order == 1:
        return (
            "d1 × s, d1 = (last output - the one before) / (their step distance) (kept per "
            "computed step)"
        )
    terms = " + ".join(
        f"d{k} × s^{k} / {math.factorial(k)}" if k > 1 else "d1 × s" for k in range(1, order + 1)
    )
    return (
        f"{terms}, where each computed step keeps its output d0 and d(k+1) = (dk - the dk "
        "kept the computed step before) / (their step distance)"
    )
