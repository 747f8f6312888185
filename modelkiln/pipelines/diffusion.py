"""The sd and sdxl families' pipelines: text-to-image, image-to-image and inpainting for
SD 1.x/2.x and SDXL on every backend.

The denoising loops are diffusers' own pipelines (StableDiffusion[XL][Img2Img|Inpaint]
Pipeline), driven by thin stand-ins for the torch models that run our Sessions: the same
prompt encoding, noise (a seeded torch.Generator: same seed, same pixels on every backend),
schedulers, guidance and VAE handling as diffusers, with only the model calls swapped. This
is how optimum's ORT/OV diffusion pipelines work too; what we add is one class over every
runtime, validated inputs with one-line errors, and progress through a callback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
import torch

from modelkiln.errors import InputError, UnsupportedError, did_you_mean
from modelkiln.images import ImageInput, load_image
from modelkiln.pipelines.base import PipelineParts, run_padded
from modelkiln.pipelines.generation import ImageGenerator
from modelkiln.profiles import MAX_IMAGES, MAX_PIXELS_PER_SIDE, MAX_STEPS
from modelkiln.progress import NullProgress, Progress
from modelkiln.quiet import quiet_libraries
from modelkiln.runtimes.base import Session
from modelkiln.runtimes.pool import Pool

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

# name -> (diffusers scheduler class, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
StepCallback = Callable[[int, float, np.ndarray], None]
# Generations that run at once on one pipeline (each holds its own tokenizers).
TOKENIZER_SETS = 8
# Bounds of one call: past them it runs for hours or exhausts memory rather than fail.
MAX_GUIDANCE = 100.0


class _SessionModule(torch.nn.Module):
    """What diffusers' pipelines read from a model (config, dtype, device); forward runs a
    Session. A torch Module, as diffusers looks among modules for the execution device."""

    def __init__(self, session: Session, config: Mapping[str, Any]) -> None:
        from diffusers.configuration_utils import FrozenDict

        super().__init__()
        self.session = session
        self.config = FrozenDict(config)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def run(self, **feeds: Any) -> dict[str, torch.Tensor]:
        """torch or numpy in, torch out; static-batch exports get padded chunks."""
        arrays = {
            name: value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            for name, value in feeds.items()
        }
        outputs = run_padded(self.session, arrays)
        return {name: torch.from_numpy(value) for name, value in outputs.items()}


class _TextEncoder(_SessionModule):
    def forward(self, input_ids: Any, attention_mask: Any = None, **unused: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        outputs = self.run(input_ids=input_ids.long())
        hidden = (
            tuple(
                outputs[name]
                for name in sorted(
                    (n for n in outputs if n.startswith("hidden_states.")),
                    key=lambda n: int(n.rsplit(".", 1)[1]),
                )
            )
            or None
        )
        if "text_embeds" in outputs:
            return CLIPTextModelOutput(
                text_embeds=outputs["text_embeds"],
                last_hidden_state=outputs["last_hidden_state"],
                hidden_states=hidden,
            )
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs["last_hidden_state"],
            pooler_output=outputs["pooler_output"],
            hidden_states=hidden,
        )


class _UNet(_SessionModule):
    def __init__(self, session: Session, config: Mapping[str, Any]) -> None:
        super().__init__(session, config)
        # SDXL checks the added-embedding width against this layer of the real UNet.
        width = config.get("projection_class_embeddings_input_dim")
        self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))

    def forward(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any,
        added_cond_kwargs: Mapping[str, Any] | None = None,
        return_dict: bool = True,
        **unused: Any,
    ) -> tuple[Any]:
        step = torch.as_tensor(timestep).reshape(-1)[0]  # one step for the whole batch
        feeds = {
            "sample": sample,
            "timestep": np.asarray(float(step), dtype=np.float32),
            "encoder_hidden_states": encoder_hidden_states,
        }
        if added_cond_kwargs:
            feeds["text_embeds"] = added_cond_kwargs["text_embeds"]
            feeds["time_ids"] = added_cond_kwargs["time_ids"].float()
        return (self.run(**feeds)["out_sample"],)


class _Vae(_SessionModule):
    """encode() through the vae_encoder session, decode() through the vae_decoder session."""

    def __init__(self, session: Session, config: Mapping[str, Any]) -> None:
        super().__init__(session, config)
        self.encoder_session: Session | None = None

    def encode(self, sample: Any, return_dict: bool = True) -> Any:
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.encoder_session is None:
            raise UnsupportedError("this artifact has no vae_encoder: rebuild it with one")
        moments = run_padded(self.encoder_session, {"sample": sample.float().numpy()})
        distribution = DiagonalGaussianDistribution(torch.from_numpy(moments["latent_parameters"]))
        return AutoencoderKLOutput(latent_dist=distribution)

    def forward(self, latent_sample: Any) -> tuple[Any]:
        return self.decode(latent_sample)

    def decode(self, latent_sample: Any, return_dict: bool = True, **unused: Any) -> tuple[Any]:
        return (self.run(latent_sample=latent_sample)["sample"],)


class SDPipeline(ImageGenerator):
    """SD 1.x/2.x: one class, three entry points (text_to_image, image_to_image, inpaint)."""

    # diffusers' pipeline classes are this prefix + Pipeline / Img2ImgPipeline / InpaintPipeline
    diffusers_prefix: ClassVar[str] = "StableDiffusion"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    stages: ClassVar[Mapping[str, str]] = {
        "unet": "unet_step",
        "vae_encoder": "vae_encode",
        "vae_decoder": "vae_decode",
    }

    def __init__(
        self,
        root: Path,
        sessions: Mapping[str, Session],
        configs: Mapping[str, Mapping[str, Any]],
        model_info: Mapping[str, Any],
        task: str = "text-to-image",
    ) -> None:
        super().__init__(sessions, task)
        self.root = root
        self.model_info = dict(model_info)
        self._text_encoders = [
            _TextEncoder(sessions[name], configs[name]) for name in self.text_encoders
        ]
        self._unet = _UNet(sessions["unet"], configs["unet"])
        self._vae = _Vae(sessions["vae_decoder"], configs["vae_decoder"])
        self._vae.encoder_session = sessions.get("vae_encoder")
        # A tokenizer keeps its padding and truncation settings between calls: one set per
        # concurrent call.
        self._tokenizer_sets = Pool(
            lambda: [self._tokenizer(folder) for folder in self.tokenizers], size=TOKENIZER_SETS
        )

    @classmethod
    def from_parts(cls, parts: PipelineParts) -> Self:
        return cls(parts.root, parts.sessions, parts.configs, parts.info, parts.task)

    # --- the three entry points --------------------------------------------------------------

    def text_to_image(self, prompt: str | Sequence[str], **settings: Any) -> list[Image.Image]:
        if self.inpainting_only:
            raise UnsupportedError(
                "this artifact's UNet is an inpainting UNet (9 input channels): use inpaint "
                "(kiln generate --image IMAGE --mask MASK)"
            )
        return self._generate("text", prompt, settings)

    def image_to_image(
        self,
        prompt: str | Sequence[str],
        image: ImageInput,
        *,
        strength: float = 0.8,
        **settings: Any,
    ) -> list[Image.Image]:
        if self.inpainting_only:
            raise UnsupportedError(
                "this artifact's UNet is an inpainting UNet (9 input channels): use inpaint"
            )
        return self._generate("image", prompt, {**settings, "image": image, "strength": strength})

    def inpaint(
        self,
        prompt: str | Sequence[str],
        image: ImageInput,
        mask: ImageInput,
        *,
        strength: float = 1.0,
        **settings: Any,
    ) -> list[Image.Image]:
        """Repaint where the mask is white; a 4-channel UNet blends the kept latents per step."""
        return self._generate(
            "inpaint", prompt, {**settings, "image": image, "mask": mask, "strength": strength}
        )

    @property
    def inpainting_only(self) -> bool:
        """A 9-channel inpainting UNet: it needs an image and a mask to run."""
        return int(self.model_info.get("unet_in_channels", 4)) == 9

    def exercise(self, prompt: str, *, seed: int, steps: int) -> Image.Image:
        """Generation never encodes: the VAE encoder gets the image generated."""
        image = super().exercise(prompt, seed=seed, steps=steps)
        encoder = self.sessions.get("vae_encoder")
        if encoder is not None:
            pixels = np.asarray(image, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
            (input_name,) = encoder.input_specs
            run_padded(encoder, {input_name: pixels})
        return image

    @property
    def size(self) -> tuple[int, int]:
        """The (height, width) the artifact was built for."""
        return int(self.model_info["height"]), int(self.model_info["width"])

    # --- shared ------------------------------------------------------------------------------

    def _generate(
        self, mode: str, prompt: str | Sequence[str], settings: Mapping[str, Any]
    ) -> list[Image.Image]:
        options = dict(settings)
        steps = int(options.pop("steps", 25))
        guidance = float(options.pop("guidance", 7.5))
        seed = int(options.pop("seed", 0))
        num_images = int(options.pop("num_images", 1))
        height, width = self._check_size(options.pop("height", None), options.pop("width", None))
        negative = options.pop("negative_prompt", None)
        negatives = None
        scheduler_name = options.pop("scheduler", None)
        callback: StepCallback | None = options.pop("callback", None)
        progress: Progress = options.pop("progress", None) or NullProgress()
        prompts = _check_prompt(prompt, "prompt")
        if negative is not None:
            negatives = _check_prompt(negative, "negative_prompt", allow_empty=True)
            if len(negatives) != len(prompts):
                raise InputError(
                    f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one "
                    "per prompt"
                )
        if not 1 <= steps <= MAX_STEPS:
            raise InputError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
        if not 1 <= num_images <= MAX_IMAGES:
            raise InputError(f"num_images must be in 1..{MAX_IMAGES} per prompt, got {num_images}")
        if not 0 <= guidance <= MAX_GUIDANCE:  # NaN fails this too
            raise InputError(f"guidance must be a number in 0..{MAX_GUIDANCE}, got {guidance}")
        call: dict[str, Any] = {
            "prompt": prompts,
            "negative_prompt": negatives,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "num_images_per_prompt": num_images,
            "generator": torch.Generator().manual_seed(seed),
            "height": height,
            "width": width,
            "output_type": "pil",
        }
        if mode in ("image", "inpaint"):
            strength = float(options.pop("strength"))
            if not 0.0 < strength <= 1.0:
                raise InputError(f"strength must be in (0, 1], got {strength}")
            call["strength"] = strength
            call["image"] = load_image(options.pop("image")).resize((width, height))
        if mode == "inpaint":
            # Any size: diffusers' mask processor resizes it to the image and binarises it.
            call["mask_image"] = load_image(options.pop("mask")).convert("L")
        if options:
            raise TypeError(f"unknown generation setting(s): {', '.join(sorted(options))}")
        with self._tokenizer_sets.borrow() as tokenizers:
            self._warn_if_truncated(tokenizers[0], prompts)
            # A pipeline (and its scheduler, which keeps the steps' state) per call.
            pipeline = self._diffusers_pipeline(mode, scheduler_name, tokenizers)
            with progress.task(f"denoising ({mode}, {steps} steps)") as advance:

                def on_step(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> Any:
                    advance(1)
                    if callback is not None:
                        callback(index, float(timestep), tensors["latents"].numpy())
                    return tensors

                with torch.inference_mode(), quiet_libraries():
                    result = pipeline(**call, callback_on_step_end=on_step)
        return list(result.images)

    def _diffusers_pipeline(
        self, mode: str, scheduler_name: str | None, tokenizers: list[Any]
    ) -> Any:
        import diffusers

        suffix = {"text": "Pipeline", "image": "Img2ImgPipeline", "inpaint": "InpaintPipeline"}
        pipeline_class = getattr(diffusers, self.diffusers_prefix + suffix[mode])
        components: dict[str, Any] = {
            "vae": self._vae,
            "unet": self._unet,
            "scheduler": self._scheduler(scheduler_name),
            **self._family_components(mode),
        }
        for index, (encoder, tokenizer) in enumerate(
            zip(self._text_encoders, tokenizers, strict=True)
        ):
            suffix_name = f"_{index + 1}" if index else ""
            components[f"text_encoder{suffix_name}"] = encoder
            components[f"tokenizer{suffix_name}"] = tokenizer
        with quiet_libraries():
            pipeline = pipeline_class(**components)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _family_components(self, mode: str) -> dict[str, Any]:
        """What the family's diffusers pipeline takes besides models and tokenizers."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def _scheduler(self, name: str | None) -> Any:
        import diffusers

        config = json.loads(
            (self.root / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")
        )
        if name is None:
            with quiet_libraries():
                return getattr(diffusers, config["_class_name"]).from_config(config)
        if name not in SCHEDULERS:
            raise InputError(
                f"unknown scheduler '{name}'{did_you_mean(name, SCHEDULERS)}; "
                f"available: {', '.join(SCHEDULERS)}"
            )
        class_name, overrides = SCHEDULERS[name]
        with quiet_libraries():
            return getattr(diffusers, class_name).from_config(config, **overrides)

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        built_height, built_width = self.size
        height, width = height or built_height, width or built_width
        for key, value in (("height", height), ("width", width)):
            if value < 8 or value % 8 or value > MAX_PIXELS_PER_SIDE:
                raise InputError(
                    f"{key} must be a positive multiple of 8 up to {MAX_PIXELS_PER_SIDE}, "
                    f"got {value}"
                )
        if not self.model_info.get("dynamic_resolution") and (height, width) != self.size:
            raise InputError(
                f"this artifact was built for {built_width}×{built_height} images only, not "
                f"{width}×{height}; rebuild with --set shapes.dynamic_resolution=true or "
                "--set shapes.width=... --set shapes.height=..."
            )
        return height, width

    def _tokenizer(self, folder: str) -> Any:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(self.root / folder)

    def _warn_if_truncated(self, tokenizer: Any, prompts: list[str]) -> None:
        limit = tokenizer.model_max_length
        for text in prompts:
            with quiet_libraries():
                count = len(tokenizer(text, truncation=False)["input_ids"])
            if count > limit:
                logger.warning(
                    "prompt is %d tokens; the text encoder reads the first %d: %r...",
                    count,
                    limit,
                    text[:60],
                )


class SDXLPipeline(SDPipeline):
    """SDXL: two text encoders and the added size / aesthetics conditioning."""

    diffusers_prefix: ClassVar[str] = "StableDiffusionXL"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")

    def _family_components(self, mode: str) -> dict[str, Any]:
        components: dict[str, Any] = {
            "force_zeros_for_empty_prompt": bool(
                self.model_info.get("force_zeros_for_empty_prompt", True)
            ),
            "add_watermarker": False,
        }
        if mode != "text":
            components["requires_aesthetics_score"] = bool(
                self.model_info.get("requires_aesthetics_score", False)
            )
        return components


def _check_prompt(prompt: Any, name: str, *, allow_empty: bool = False) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list | tuple) or not prompts:
        raise InputError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    for item in prompts:
        if not isinstance(item, str):
            raise InputError(f"{name} must be text, got {type(item).__name__} {item!r}")
        if not allow_empty and not item.strip():
            raise InputError(f"{name} is empty; describe the image to generate")
    return list(prompts)
