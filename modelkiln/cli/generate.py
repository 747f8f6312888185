"""`kiln generate`, `kiln lora-adapter`: running a diffusion artifact's pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from modelkiln.cli.build import lora_option
from modelkiln.cli.console import (
    DEVICE_OPTION,
    RUNTIME_OPTION,
    THREADS_OPTION,
    out,
    progress_display,
)
from modelkiln.cli.jsonout import JSON_OPTION, emit_json
from modelkiln.cli.run import COMMANDS
from modelkiln.errors import InputError
from modelkiln.outputs import atomic_file, check_writable
from modelkiln.profiles import MAX_IMAGES, MAX_STEPS, MAX_TAYLORSEER_ORDER


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="What to draw.")
@click.option("--negative-prompt", help="What to steer away from.")
@click.option(
    "--steps",
    type=click.IntRange(1, MAX_STEPS),
    help="Denoising steps.  [default: the build's [generation] steps, else diffusers' for the "
    "family: SD, SDXL 50; SD3 28, image and inpaint 50; Flux 28]",
)
@click.option(
    "--guidance",
    type=float,
    help="Classifier-free guidance scale, 1.0: no CFG pass; Flux dev: the embedded guidance.  "
    "[default: the build's [generation] guidance, else diffusers' for the family: SD 7.5; "
    "SDXL 5.0, inpainting 7.5; SD3 7.0; "
    "Flux 3.5, image 7.0]",
)
@click.option(
    "--split-guidance",
    is_flag=True,
    help="Run guidance's negative and positive halves as two denoiser calls instead of one "
    "of twice the batch: about half the denoiser's activation memory (SD 3.5 Large at "
    "1024x1024), the same image.",
)
@click.option(
    "--guidance-end",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    help="Guide only the first fraction of the steps; the rest run the prompt's half alone, "
    "at half the denoiser's work: faster, a slightly different image.  [default: the "
    "build's [generation] guidance_end, else 1.0]",
)
@click.option(
    "--cache-interval",
    type=click.IntRange(1, 1000),
    help="Run the whole UNet on one step in N and its shallow half, on the kept deep "
    "features, on the others (DeepCache; the artifact needs model.deep_cache): faster, a "
    "slightly different image; 1 runs the whole UNet every step.  [default: the build's "
    "model.deep_cache, else 1]",
)
@click.option(
    "--cache-threshold",
    type=click.FloatRange(0.0, 1.0),
    help="Skip the transformer's later blocks on the steps where its first block's output "
    "changed less than this fraction since the last computed step, reusing what they added "
    "then (First Block Cache; SD3 and Flux, the artifact needs model.first_block_cache): "
    "faster, a slightly different image; 0 computes every step.  [default: the build's "
    "model.first_block_cache, else 0]",
)
@click.option(
    "--taylorseer-interval",
    type=click.IntRange(1, 1000),
    help="Run the denoiser on one step in N after the warm-up and forecast its output on "
    "the others from the last computed ones (TaylorSeer Lite, as OpenVINO GenAI's; any "
    "artifact, no rebuild): faster, a slightly different image; 1 computes every step.  "
    "[default: the build's [generation] taylorseer_interval, else 1]",
)
@click.option(
    "--taylorseer-warmup",
    type=click.IntRange(0, 1000),
    help="Steps computed before TaylorSeer forecasts any.  [default: the build's, else 6]",
)
@click.option(
    "--taylorseer-cooldown",
    type=click.IntRange(0, 1000),
    help="Last steps TaylorSeer computes again.  [default: the build's, else 2]",
)
@click.option(
    "--taylorseer-order",
    type=click.IntRange(1, MAX_TAYLORSEER_ORDER),
    help="The highest derivative TaylorSeer's forecast uses (1: GenAI's Lite; 2 or 3: "
    "diffusers' max_order).  [default: the build's, else 1]",
)
@click.option(
    "--low-memory",
    is_flag=True,
    help="Hold one component in memory at a time (text encoders, denoiser, VAE), each loaded "
    "when needed: for models near the machine's memory, slower by the loading.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same pixels.")
@click.option(
    "--width",
    type=int,
    help="Image width in pixels, a multiple of 8.  [default: the size the artifact was built for]",
)
@click.option(
    "--height",
    type=int,
    help="Image height in pixels, a multiple of 8.  [default: the size the artifact was built for]",
)
@click.option(
    "--num-images",
    default=1,
    show_default=True,
    type=click.IntRange(1, MAX_IMAGES),
    help="Images per prompt; several are written OUT-0.png, OUT-1.png, ...",
)
@click.option(
    "--scheduler",
    help="The sampler: euler, euler-ancestral, dpmpp-2m, dpmpp-2m-karras, ddim, ...  "
    "[default: the artifact's: the build's [generation] scheduler, else the model's own]",
)
@click.option("--image", "init_image", help="Start from this image (image-to-image, inpaint).")
@click.option(
    "--strength",
    type=float,
    help="How much to change --image.  [default: diffusers' for the family: SD 0.8 and 1.0 "
    "for inpainting, SDXL 0.3 and 0.9999, SD3 and Flux 0.6]",
)
@click.option("--mask", help="Inpaint where this mask is white (any size).")
@click.option(
    "--control-image",
    multiple=True,
    help="ControlNet artifacts: the conditioning image (edges, depth, pose); one per ControlNet "
    "of a multi-ControlNet artifact, in order.",
)
@click.option(
    "--control-scale",
    type=float,
    multiple=True,
    help="How strongly the ControlNet conditions the image: one for all, or one per "
    "--control-image.  [default: 1.0]",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="PATH[:SCALE]",
    help="Artifacts built with [runtime_lora]: apply this LoRA (.safetensors, peft folder or "
    ".onnx_adapter) at SCALE (default 1.0) without a rebuild; repeat for several.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="The image to write, OUT.png (.jpg, .webp, ...: the suffix picks the format).",
)
@RUNTIME_OPTION
@THREADS_OPTION
@DEVICE_OPTION
@JSON_OPTION
def generate(
    artifact: Path,
    prompt: str,
    negative_prompt: str | None,
    steps: int | None,
    guidance: float | None,
    split_guidance: bool,
    guidance_end: float | None,
    cache_interval: int | None,
    cache_threshold: float | None,
    taylorseer_interval: int | None,
    taylorseer_warmup: int | None,
    taylorseer_cooldown: int | None,
    taylorseer_order: int | None,
    low_memory: bool,
    seed: int,
    width: int | None,
    height: int | None,
    num_images: int,
    scheduler: str | None,
    init_image: str | None,
    strength: float | None,
    mask: str | None,
    control_image: tuple[str, ...],
    control_scale: tuple[float, ...],
    loras: tuple[str, ...],
    output: Path,
    runtime: str | None,
    threads: int | None,
    device: str | None,
    as_json: bool,
) -> None:
    """Text-to-image, image-to-image (--image) or inpainting (--image --mask) with ARTIFACT,
    conditioned on --control-image where the artifact has a ControlNet."""
    from modelkiln.loading import load
    from modelkiln.pipelines.generation import ImageGenerator

    if mask is not None and init_image is None:
        raise InputError("--mask needs --image: the image to inpaint")
    if strength is not None and init_image is None:
        raise InputError("--strength applies to --image (image-to-image or inpainting)")
    if control_scale and not control_image:
        raise InputError("--control-scale applies to --control-image")
    chosen = [lora_option(text) for text in loras]
    # Found now, not after minutes of denoising.
    image_format(output)
    for path in numbered_outputs(output, num_images):
        check_writable(path, folder=False)
    settings: dict[str, Any] = {
        "negative_prompt": negative_prompt,
        "steps": steps,
        "guidance": guidance,
        "split_guidance": split_guidance,
        "guidance_end": guidance_end,
        "cache_interval": cache_interval,
        "cache_threshold": cache_threshold,
        "taylorseer_interval": taylorseer_interval,
        "taylorseer_warmup": taylorseer_warmup,
        "taylorseer_cooldown": taylorseer_cooldown,
        "taylorseer_order": taylorseer_order,
        "seed": seed,
        "width": width,
        "height": height,
        "num_images": num_images,
        "scheduler": scheduler,
    }
    if control_image:
        settings["control_image"] = list(control_image)
        settings["control_scale"] = list(control_scale) or 1.0
    with (
        load(
            artifact, runtime=runtime, threads=threads, device=device, low_memory=low_memory
        ) as pipeline,
        progress_display() as progress,
    ):
        if not isinstance(pipeline, ImageGenerator):
            command = COMMANDS.get(pipeline.task, "modelkiln.load() in Python")
            raise InputError(
                f"this artifact was built for {pipeline.task}, not image generation; "
                f"use `{command}`"
            )
        if chosen:
            pipeline.set_loras([(lora.path, lora.scale) for lora in chosen])
        settings["progress"] = progress
        if mask is not None and init_image is not None:
            images = pipeline.inpaint(prompt, init_image, mask, strength=strength, **settings)
        elif init_image is not None:
            images = pipeline.image_to_image(prompt, init_image, strength=strength, **settings)
        else:
            images = pipeline.text_to_image(prompt, **settings)
    written = numbered_outputs(output, len(images))
    for image, path in zip(images, written, strict=True):
        with atomic_file(path) as staged:
            image.save(staged, format=image_format(path))
        if not as_json:
            out.print(f"[green]wrote[/] {escape(str(path))} ({image.width}×{image.height})")
    if as_json:
        emit_json(
            {
                "files": [str(path) for path in written],
                "width": images[0].width,
                "height": images[0].height,
                "seed": seed,
                "prompt": prompt,
            }
        )


@click.command("lora-adapter")
@click.argument("artifact", type=click.Path(path_type=Path, exists=True))
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:SCALE]...")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="The adapter file to write, OUT.onnx_adapter.",
)
@JSON_OPTION
def lora_adapter(artifact: Path, loras: tuple[str, ...], output: Path, as_json: bool) -> None:
    """Write LORAS (.safetensors or peft folders, each LORA[:SCALE], default 1.0) as one ONNX
    Runtime adapter file for ARTIFACT's run-time LoRA slots: `kiln generate --lora
    OUT.onnx_adapter` and ONNX Runtime's own LoraAdapter (C++, C#, Java, mobile) run it
    without torch."""
    from modelkiln.checkpoints.lora_slots import write_artifact_adapter

    check_writable(output, folder=False)
    chosen = [lora_option(text) for text in loras]
    written = write_artifact_adapter(artifact, chosen, output)
    if as_json:
        applied = [{"path": lora.path, "scale": lora.scale} for lora in chosen]
        emit_json({"artifact": str(artifact), "files": [str(written)], "loras": applied})
        return
    out.print(f"[green]wrote[/] {escape(str(written))}")


def image_format(path: Path) -> str:
    """The PIL format that writes path's suffix, or a one-line error naming the usual ones."""
    from PIL import Image

    Image.init()
    name = Image.registered_extensions().get(path.suffix.lower())
    if name is None or name not in Image.SAVE:
        raise InputError(
            f"cannot write an image as {path.name!r}: unknown image type "
            f"{path.suffix or '(no suffix)'!r}; name it .png, .jpg or .webp"
        )
    return name


def numbered_outputs(output: Path, count: int) -> list[Path]:
    """OUT.png for one image; OUT-0.png, OUT-1.png, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]
