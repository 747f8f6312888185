"""The sd and sdxl families' pipelines: text-to-image, image-to-image and inpainting for
SD 1.x/2.x and SDXL on every backend, in numpy (modelkiln/diffusion/).

They reproduce diffusers' StableDiffusion[XL][Img2Img|Inpaint]Pipeline: the same
tokenization, prompt encoding, noise (a numpy copy of torch's CPU generator: the same seed
gives diffusers' initial noise), schedulers, guidance, VAE scaling and defaults per family,
without torch, diffusers or transformers. Safe to share between threads: each call has its
own generator, scheduler and latents.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np

from modelkiln.diffusion.control import control_to_pixels, controlled_denoiser, controlnet_names
from modelkiln.diffusion.denoise import (
    SHALLOW_UNET,
    Conditioning,
    DeepCacheDenoiser,
    Denoiser,
    Inpainting,
    Vae,
    denoise,
    start_timesteps,
    unet_denoiser,
)
from modelkiln.diffusion.forecast import ForecastSchedule, TaylorSeerDenoiser
from modelkiln.diffusion.images import image_to_pixels, mask_to_pixels, pixels_to_images
from modelkiln.diffusion.lora import slot_feeds, slot_layers
from modelkiln.diffusion.noise import TorchGenerator
from modelkiln.diffusion.request import Defaults, Request, check_latents, parse_request
from modelkiln.diffusion.schedulers import Scheduler, scheduler_from_config
from modelkiln.diffusion.tokenizer import ClipTokenizer
from modelkiln.errors import ArtifactError, InputError, UnsupportedError
from modelkiln.images import ImageInput
from modelkiln.jsonfile import read_json_object
from modelkiln.pipelines.base import APPROXIMATIONS, PipelineParts, run_padded
from modelkiln.pipelines.generation import ImageGenerator
from modelkiln.profiles import MAX_PIXELS_PER_SIDE
from modelkiln.runtimes.base import Session

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)


class SDPipeline(ImageGenerator):
    """SD 1.x/2.x: one class, three entry points (text_to_image, image_to_image, inpaint)."""

    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    stages: ClassVar[Mapping[str, str]] = {
        "unet": "unet_step",
        SHALLOW_UNET: "unet_shallow_step",
        "controlnet": "controlnet_step",
        "vae_encoder": "vae_encode",
        "vae_decoder": "vae_decode",
    }
    # DeepCache's shallow UNet alternates with the UNet: low_memory keeps it open apart.
    resident_apart: ClassVar[frozenset[str]] = frozenset({SHALLOW_UNET})
    # diffusers' __call__ defaults for the family, per mode: the same call, the same image.
    default_steps: ClassVar[Mapping[str, int]] = {"text": 50, "image": 50, "inpaint": 50}
    default_guidance: ClassVar[Mapping[str, float]] = {"text": 7.5, "image": 7.5, "inpaint": 7.5}
    default_image_strength: ClassVar[float] = 0.8
    default_inpaint_strength: ClassVar[float] = 1.0

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
        self._check_denoiser(configs)
        self._unet_config = dict(configs.get("unet", {}))  # SD3 and Flux have none
        self._tokenizers = [ClipTokenizer.from_folder(root / folder) for folder in self.tokenizers]
        self._vae = self._make_vae(sessions, configs["vae_decoder"])
        self._scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json")

    @classmethod
    def from_parts(cls, parts: PipelineParts) -> Self:
        return cls(parts.root, parts.sessions, parts.configs, parts.info, parts.task)

    def set_loras(self, loras: Sequence[tuple[str | Path, float]]) -> None:
        """Apply LoRAs to the calls that follow, without a rebuild: each a .safetensors file,
        a peft folder or an .onnx_adapter (kiln lora-adapter), with its scale; [] removes
        them. The artifact's UNet needs run-time LoRA slots ([runtime_lora])."""
        unet = self.sessions.get("unet")
        slots = slot_layers(unet.input_specs) if unet is not None else {}
        if unet is None or not slots:
            raise UnsupportedError(
                "this artifact has no run-time LoRA slots (SD 1.x/2.x and SDXL UNets built with "
                "--set runtime_lora.enabled=true on ONNX Runtime have); fuse LoRAs at build "
                "(kiln build --lora)"
            )
        # Torch-free for adapter files; a LoRA file needs diffusers (it says so without).
        from modelkiln.checkpoints.lora_slots import read_lora

        matrices = [(read_lora(Path(path), self._unet_config), scale) for path, scale in loras]
        unet.bind(slot_feeds(slots, matrices))

    # --- the three entry points --------------------------------------------------------------

    def text_to_image(self, prompt: str | Sequence[str], **settings: Any) -> list[Image.Image]:
        if self.inpainting_only:
            raise UnsupportedError(
                "this artifact's UNet is an inpainting UNet (9 input channels): use inpaint "
                "(kiln generate --image IMAGE --mask MASK)"
            )
        return self._generate(self._request("text", prompt, settings))

    def image_to_image(
        self,
        prompt: str | Sequence[str],
        image: ImageInput,
        *,
        strength: float | None = None,
        **settings: Any,
    ) -> list[Image.Image]:
        if self.inpainting_only:
            raise UnsupportedError(
                "this artifact's UNet is an inpainting UNet (9 input channels): use inpaint"
            )
        strength = self.default_image_strength if strength is None else strength
        request = self._request("image", prompt, {**settings, "image": image, "strength": strength})
        return self._generate(request)

    def inpaint(
        self,
        prompt: str | Sequence[str],
        image: ImageInput,
        mask: ImageInput,
        *,
        strength: float | None = None,
        **settings: Any,
    ) -> list[Image.Image]:
        """Repaint where the mask is white; a 4-channel UNet blends the kept latents per step."""
        strength = self.default_inpaint_strength if strength is None else strength
        settings = {**settings, "image": image, "mask": mask, "strength": strength}
        return self._generate(self._request("inpaint", prompt, settings))

    @property
    def inpainting_only(self) -> bool:
        """A 9-channel inpainting UNet: it needs an image and a mask to run."""
        return int(self.model_info.get("unet_in_channels", 4)) == 9

    def exercise(self, prompt: str, *, seed: int, steps: int) -> Image.Image:
        """Generation never encodes: the VAE encoder gets the image generated."""
        image = super().exercise(prompt, seed=seed, steps=steps)
        encoder = self.sessions.get("vae_encoder")
        if encoder is not None:
            run_padded(encoder, {"sample": image_to_pixels(image, image.height, image.width)})
        return image

    @property
    def size(self) -> tuple[int, int]:
        """The (height, width) the artifact was built for."""
        return int(self.model_info["height"]), int(self.model_info["width"])

    # --- one generation ----------------------------------------------------------------------

    def _generate(self, request: Request) -> list[Image.Image]:
        generator = TorchGenerator(request.seed)
        scheduler = self._scheduler(request.scheduler)
        for prompt in request.prompts:
            self._warn_if_truncated(prompt)
        conditioning = self._conditioning(request)
        timesteps = self._timesteps(request, scheduler)
        if len(timesteps) == 0:
            raise InputError(
                f"strength {request.strength} with {request.steps} steps leaves no step to run; "
                "raise the strength or the steps"
            )
        latents, inpainting = self._start(request, scheduler, timesteps, generator)
        description = f"denoising ({request.mode}, {len(timesteps)} steps)"
        with request.progress.task(description, total=len(timesteps)) as advance:

            def on_step(index: int, timestep: float, current: np.ndarray) -> None:
                advance(1)
                if request.callback is not None:
                    request.callback(index, timestep, current)

            latents = denoise(
                self._forecasting(self._denoiser(request), request, len(timesteps)),
                scheduler,
                latents,
                timesteps,
                conditioning,
                self._guidance_scale(request),
                generator,
                inpainting=inpainting,
                on_step=on_step,
                split_guidance=request.split_guidance,
                guidance_end=request.guidance_end,
            )
        return pixels_to_images(self._vae.decode(self._unpacked(latents, request)))

    def _start(
        self,
        request: Request,
        scheduler: Scheduler,
        timesteps: np.ndarray,
        generator: TorchGenerator,
    ) -> tuple[np.ndarray, Inpainting | None]:
        """The starting latents (and the inpainting state), drawing noise in diffusers' order."""
        shape = self._latent_shape(request)
        if request.mode == "text":
            noise = request.latents if request.latents is not None else generator.randn(shape)
            return (noise * scheduler.init_noise_sigma).astype(np.float32), None
        assert request.image is not None
        pixels = image_to_pixels(request.image, request.height, request.width)
        first = np.repeat(timesteps[:1], request.batch)
        if request.mode == "image":
            image_latents = self._batched(self._vae.encode(pixels, generator), request.batch)
            noise = generator.randn(shape)
            return scheduler.add_noise(image_latents, noise, first), None
        return self._start_inpainting(request, scheduler, pixels, first, generator)

    def _start_inpainting(
        self,
        request: Request,
        scheduler: Scheduler,
        pixels: np.ndarray,
        first: np.ndarray,
        generator: TorchGenerator,
    ) -> tuple[np.ndarray, Inpainting]:
        assert request.mask is not None
        full_strength = request.strength == 1.0
        image_latents = None
        if not self.inpainting_only or (request.latents is None and not full_strength):
            image_latents = self._batched(self._vae.encode(pixels, generator), request.batch)
        if request.latents is not None:
            noise = request.latents
            latents = noise * scheduler.init_noise_sigma
        else:
            noise = generator.randn(self._latent_shape(request))
            if full_strength:
                latents = noise * scheduler.init_noise_sigma
            else:
                assert image_latents is not None
                latents = scheduler.add_noise(image_latents, noise, first)
        mask = mask_to_pixels(request.mask, request.height, request.width)
        masked = self._vae.encode(pixels * (mask < 0.5), generator)
        step = self._vae.pixels_per_latent
        inpainting = Inpainting(
            mask=self._batched(mask[:, :, ::step, ::step], request.batch),  # torch's "nearest"
            masked_image_latents=self._batched(masked, request.batch),
            image_latents=None if self.inpainting_only else image_latents,
            noise=noise,
        )
        return latents.astype(np.float32), inpainting

    def _latent_shape(self, request: Request) -> tuple[int, int, int, int]:
        step = self._vae.pixels_per_latent
        channels = self._vae.latent_channels
        return (request.batch, channels, request.height // step, request.width // step)

    @staticmethod
    def _batched(array: np.ndarray, batch: int) -> np.ndarray:
        return np.concatenate([array] * (batch // array.shape[0]))

    # --- what differs between families -------------------------------------------------------

    def _check_denoiser(self, configs: Mapping[str, Mapping[str, Any]]) -> None:
        if configs["unet"].get("time_cond_proj_dim") is not None:
            raise UnsupportedError(
                "this UNet is guidance-distilled (time_cond_proj_dim): modelkiln does not run "
                "guidance embeddings yet"
            )

    def _denoiser(self, request: Request) -> Denoiser:
        unet = self.sessions["unet"]
        if request.cache_interval > 1:
            return self._caching_denoiser(unet, request.cache_interval)
        names = controlnet_names(self.sessions)
        if not names:
            return unet_denoiser(unet)
        size = request.height, request.width
        controls = [control_to_pixels(image, *size) for image in request.control_images]
        nets = [self.sessions[name] for name in names] if controls else []
        return controlled_denoiser(nets, unet, controls, request.control_scales)

    @staticmethod
    def _forecasting(denoiser: Denoiser, request: Request, steps: int) -> Denoiser:
        """The denoiser, or TaylorSeer's forecast of it where the call asks (any family)."""
        if request.taylorseer_interval <= 1:
            return denoiser
        schedule = ForecastSchedule(
            request.taylorseer_interval,
            request.taylorseer_warmup,
            request.taylorseer_cooldown,
            steps,
            request.taylorseer_order,
        )
        return TaylorSeerDenoiser(denoiser, schedule)

    def _caching_denoiser(self, unet: Session, interval: int) -> Denoiser:
        shallow = self.sessions.get(SHALLOW_UNET)
        if shallow is None:
            raise UnsupportedError(
                f"cache_interval {interval} reuses the UNet's deep features, and this artifact "
                f"has no {SHALLOW_UNET}: rebuild it with --set model.deep_cache={interval}, or "
                "run with cache_interval 1"
            )
        return DeepCacheDenoiser(unet, shallow, interval)

    def _guidance_scale(self, request: Request) -> float:
        """Classifier-free guidance's scale (1: none)."""
        return request.guidance

    def _timesteps(self, request: Request, scheduler: Scheduler) -> np.ndarray:
        strength = 1.0 if request.mode == "text" else request.strength
        return start_timesteps(scheduler, request.steps, strength)

    def _unpacked(self, latents: np.ndarray, request: Request) -> np.ndarray:
        """The final latents as the VAE decodes them."""
        return latents

    def _conditioning(self, request: Request) -> Conditioning:
        """SD: the text encoder's last hidden state; the negative prompts' first when guided."""
        positive = self._encode(self._tokenizers[0], "text_encoder", request.prompts)
        positive = np.repeat(positive, request.num_images, axis=0)
        if request.guidance <= 1.0:
            return Conditioning(positive)
        negatives = request.negatives or [""] * len(request.prompts)
        negative = self._encode(self._tokenizers[0], "text_encoder", negatives)
        negative = np.repeat(negative, request.num_images, axis=0)
        return Conditioning(np.concatenate([negative, positive]))

    def _encode(self, tokenizer: ClipTokenizer, encoder: str, prompts: list[str]) -> np.ndarray:
        outputs = run_padded(self.sessions[encoder], {"input_ids": tokenizer(prompts)})
        return outputs["last_hidden_state"]

    def _make_vae(self, sessions: Mapping[str, Session], config: Mapping[str, Any]) -> Vae:
        return Vae(
            decoder=sessions["vae_decoder"],
            encoder=sessions.get("vae_encoder"),
            scaling_factor=float(config.get("scaling_factor", 0.18215)),
            shift_factor=float(config.get("shift_factor") or 0.0),
            # diffusers' vae_scale_factor: the decoder upsamples once per block but the last.
            pixels_per_latent=2 ** (len(config.get("block_out_channels", (0,) * 4)) - 1),
            latent_channels=int(config.get("latent_channels", 4)),
        )

    # --- settings ----------------------------------------------------------------------------

    def _request(self, mode: str, prompt: Any, settings: Mapping[str, Any]) -> Request:
        # The build's [generation] defaults (a few-step model's), else diffusers' call's.
        chosen = self.model_info.get("generation") or {}
        steps = {kind: int(chosen.get("steps", n)) for kind, n in self.default_steps.items()}
        guidance = {
            kind: float(chosen.get("guidance", g)) for kind, g in self.default_guidance.items()
        }
        approximations = self.model_info.get(APPROXIMATIONS) or {}
        defaults = Defaults(
            steps,
            guidance,
            float(approximations.get("guidance_end", 1.0)),
            int(approximations.get("deep_cache", 1)),
            float(approximations.get("first_block_cache", 0.0)),
            int(approximations.get("taylorseer_interval", 1)),
            int(approximations.get("taylorseer_warmup", Defaults.taylorseer_warmup)),
            int(approximations.get("taylorseer_cooldown", Defaults.taylorseer_cooldown)),
            int(approximations.get("taylorseer_order", Defaults.taylorseer_order)),
        )
        request = parse_request(mode, prompt, settings, defaults, self._check_size)
        self._check_caching(request)
        nets = len(controlnet_names(self.sessions))
        given = len(request.control_images)
        if given and not nets:
            raise InputError(
                "this artifact has no ControlNet: build a StableDiffusion(XL)ControlNetPipeline "
                "folder to condition on a control image"
            )
        if given and given != nets:
            raise InputError(
                f"this artifact has {nets} ControlNets and got {given} control image(s); give "
                "one per ControlNet, in their order (controlnet, controlnet_1, ...)"
            )
        if request.latents is not None:
            check_latents(request, self._latent_shape(request))
        return request

    def _check_caching(self, request: Request) -> None:
        """The step caches this pipeline's denoiser has: DeepCache's, for a UNet."""
        if request.cache_threshold > 0:
            raise UnsupportedError(
                "cache_threshold skips a transformer's later blocks (SD3, Flux); this "
                "pipeline's denoiser is a UNet: leave it at 0 and reuse the UNet's deep "
                "features with cache_interval (model.deep_cache)"
            )

    def _scheduler(self, name: str | None) -> Scheduler:
        return scheduler_from_config(self._scheduler_config, name)

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

    def _warn_if_truncated(self, prompt: str) -> None:
        tokenizer = self._tokenizers[0]
        count = tokenizer.count(prompt)
        if count > tokenizer.model_max_length:
            logger.warning(
                "prompt is %d tokens; the text encoder reads the first %d: %r...",
                count,
                tokenizer.model_max_length,
                prompt[:60],
            )


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, ArtifactError, fix="; rebuild the artifact")


__all__ = ["SDPipeline"]
