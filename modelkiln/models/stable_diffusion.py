"""Stable Diffusion 1.x/2.x (family "sd") and SDXL (family "sdxl"), inpainting variants included.

Components and IO follow optimum's diffusion exports, so that optimum's ORT/OV pipelines load
what we build: text_encoder [, text_encoder_2], unet (sample, timestep, encoder_hidden_states
[, text_embeds, time_ids] -> out_sample), vae_encoder (sample -> latent_parameters) and
vae_decoder (latent_sample -> sample). Components load lazily, one at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.diffusion.block_cache import TRANSFORMER_HEAD
from modelkiln.diffusion.control import CONTROLNET, controlnet_names, is_controlnet
from modelkiln.diffusion.denoise import DEEP_FEATURES, SHALLOW_UNET
from modelkiln.diffusion.schedulers import SCHEDULERS
from modelkiln.errors import ProfileError, SourceError, UnsupportedError
from modelkiln.models.base import PROMPTS, LoadedModel, ModelFamily
from modelkiln.models.diffusers_files import (
    generation_defaults,
    read_config,
    require_dir,
    save_reference,
    shared_files,
    tokenizer_length,
    weight_files,
    with_scheduler,
)
from modelkiln.models.diffusion_signatures import (
    TEXT_ENCODERS,
    TIMESTEPS,
    component_config,
    controlnet_residuals,
    controlnet_signature,
    deep_features_spec,
    text_encoder_signature,
    unet_signature,
    vae_signature,
)
from modelkiln.models.runtime_lora_slots import check_runtime_lora, with_lora_slots
from modelkiln.models.step_caches import FORECAST_KNOB, check_deep_cache, check_token_merging
from modelkiln.sources import ResolvedSource, weights_digest
from modelkiln.specs import ComponentSpec, TensorSpec

if TYPE_CHECKING:
    from collections.abc import Collection

    import torch

    from modelkiln.profiles import Profile
    from modelkiln.records import Manifest

TEXT_TO_IMAGE = "text-to-image"
INPAINTING = "inpainting"
# diffusers pipeline classes -> (family, inpainting UNet expected)
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionControlNetPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusionXLControlNetPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "StableDiffusion3InpaintPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
}
# Tolerances of an fp32 export against torch (optimum validates SD components with 1e-3).
ATOL = {"text_encoder": 1e-3, "text_encoder_2": 1e-3, "unet": 1e-3, "controlnet": 1e-3}
VAE_ATOL = 1e-3
FLOW_MATCH = "flow-match-euler"  # the scheduler of the flow-matching families (SD3, Flux)


class StableDiffusionFamily(ModelFamily):
    name: ClassVar[str] = "sd"
    summary: ClassVar[str] = (
        "diffusers StableDiffusionPipeline / Img2Img / Inpaint directories (SD 1.x, 2.x)"
    )
    xl: ClassVar[bool] = False  # SDXL's second text encoder and added conditioning
    # The network that denoises (its folder and component name), and its batch per image
    # batch: 2, as it runs the CFG-doubled batch.
    denoiser: ClassVar[str] = "unet"
    denoiser_batch_factor: ClassVar[int] = 2
    # Text encoder -> the tokenizer folder that feeds it.
    tokenizer_folders: ClassVar[Mapping[str, str]] = {"text_encoder": "tokenizer"}
    required_folders: ClassVar[tuple[str, ...]] = (
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
    )
    # The denoiser's sample_size when its config has none (diffusers' default_sample_size).
    default_sample_size: ClassVar[int] = 64
    # A denoiser of this many input channels reads the mask and the kept image: inpainting.
    inpainting_channels: ClassVar[int] = 9
    # The T5 text encoder (SD3, Flux), and the tokens diffusers' pipelines feed it.
    t5_encoder: ClassVar[str] = ""  # "": none
    t5_sequence_length: ClassVar[int] = 0
    tasks: ClassVar[tuple[str, ...]] = (TEXT_TO_IMAGE, INPAINTING)
    pipelines: ClassVar[Mapping[str, str]] = {
        "stable-diffusion": "modelkiln.pipelines.diffusion:SDPipeline"
    }
    real_inputs: ClassVar[str] = PROMPTS
    # Guidance on the first half of the steps only (half the denoiser's batch on the rest);
    # the whole UNet on one step in 3, its shallow half on the others (DeepCache); half the
    # tokens of its highest-resolution self-attention (ToMe for SD, tomesd's default ratio);
    # the UNet on one step in 3 and its output forecast between (TaylorSeer).
    tuning_knobs: ClassVar[tuple[str | tuple[str, ...], ...]] = (
        "generation.guidance_end=0.5",
        "model.deep_cache=3",
        "model.token_merging_ratio=0.5",
        FORECAST_KNOB,
    )
    caches_steps: ClassVar[bool] = True
    merges_unet_tokens: ClassVar[bool] = True
    fuses_lora: ClassVar[bool] = True
    runtime_lora: ClassVar[bool] = True
    schedulers: ClassVar[tuple[str, ...]] = tuple(n for n in SCHEDULERS if n != FLOW_MATCH)
    notable_ops: ClassVar[frozenset[str]] = frozenset({"group_norm"})  # UNet and VAE
    # The pipeline reads model_index.json, the scheduler config and the CLIP tokenizer.
    bundle_configs: ClassVar[tuple[str, ...]] = ("model_index.json", "scheduler/", "tokenizer/")
    usage: ClassVar[Mapping[str, str]] = {
        TEXT_TO_IMAGE: 'kiln generate {bundle} --prompt "a lighthouse at dusk" -o image.png',
        INPAINTING: (
            'kiln generate {bundle} --prompt "a red door" --image IMAGE.png --mask MASK.png '
            "-o image.png"
        ),
    }

    @classmethod
    def app_notes(cls, manifest: Manifest, files: Collection[str]) -> str:
        """Tokenizing, guidance, the scheduler and decoding around the UNet (SD3's and Flux's
        transformers get none yet: the notes need a unet)."""
        from modelkiln.models.app_notes import diffusion_notes

        return diffusion_notes(manifest, files)

    @classmethod
    def export_spec(cls, spec: ComponentSpec, format: str) -> ComponentSpec:
        """OpenVINO GenAI (and optimum-intel) feed the UNet an int64 timestep of shape (1,):
        an OpenVINO UNet takes that, so OpenVINO GenAI runs the artifact as it is."""
        if format != "openvino" or spec.name != "unet":
            return spec
        timestep = TensorSpec("int64", (1,), value_range=TIMESTEPS)
        return replace(spec, inputs={**spec.inputs, "timestep": timestep})

    @classmethod
    def check_profile(cls, profile: Profile, origin: str) -> None:
        super().check_profile(profile, origin)
        if profile.runtime_lora.enabled:
            check_runtime_lora(profile, cls.denoiser, origin)
            if profile.model.deep_cache:
                raise UnsupportedError(
                    f"{origin}: model.deep_cache and [runtime_lora] do not combine (the shallow "
                    "UNet has no LoRA slots); fuse LoRAs at build ([[lora]]) to cache steps"
                )
        if profile.model.token_merging_ratio and profile.shapes.dynamic_resolution:
            raise UnsupportedError(
                f"{origin}: model.token_merging_ratio needs shapes.dynamic_resolution = false: "
                "the grid of tokens it merges in is fixed when the UNet is exported"
            )

    @classmethod
    def matches(cls, source: ResolvedSource) -> bool:
        index = source.read_json("model_index.json")
        return index is not None and PIPELINE_CLASSES.get(index.get("_class_name", "")) == cls.name

    @classmethod
    def load(cls, source: ResolvedSource, profile: Profile) -> LoadedModel:
        root = source.local_dir
        index = source.read_json("model_index.json") or {}
        for folder in cls.required_folders:
            require_dir(root, folder, source.spec, cls.required_folders)
        denoiser_config = read_config(root / cls.denoiser)
        vae_config = read_config(root / "vae")
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        height, width = _resolution(profile, denoiser_config, factor, cls.default_sample_size)
        dims = cls._dims(height, width, factor, denoiser_config)
        if (root / CONTROLNET).is_dir() and profile.shapes.dynamic_resolution:
            raise UnsupportedError(
                f"{root}: a ControlNet pipeline is built at a fixed resolution (its residuals' "
                "sizes are the UNet's inputs); set shapes.dynamic_resolution = false"
            )
        cls._check_step_cache(root, denoiser_config, profile)
        if profile.model.token_merging_ratio:
            latent = (dims["latent_height"], dims["latent_width"])
            check_token_merging(root, denoiser_config, latent, profile.export.format)
        sequences = cls._sequences(root)
        slots = profile.runtime_lora.targets if profile.runtime_lora.enabled else ()
        weights: dict[str, str] = {}
        components = []
        for name, folder in cls._component_folders(root, cls._step_cache_components(profile)):
            files = weight_files(root / folder, source.allow_pickle)
            weights.update({f"{folder}/{k}": v for k, v in weights_digest(files).items()})
            component = cls._component(
                name, root / folder, files, source.allow_pickle, dims, sequences, profile
            )
            if name == cls.denoiser and slots:
                component = with_lora_slots(component, root / folder, slots)
            components.append(component)
        task = cls._task(denoiser_config)
        return LoadedModel(
            family=cls.name,
            task=task,
            pipeline=cls.pipeline_for(task),
            components=components,
            model_info={
                "pipeline_class": index.get("_class_name"),
                "height": height,
                "width": width,
                "vae_scale_factor": factor,
                "scaling_factor": vae_config.get("scaling_factor", 0.18215),
                "shift_factor": vae_config.get("shift_factor"),
                "latent_channels": vae_config.get("latent_channels", 4),
                "sequence_length": sequences["text_encoder"],
                "dynamic_resolution": profile.shapes.dynamic_resolution,
                **cls._model_info(root, index, denoiser_config, sequences),
                **generation_defaults(profile),
            },
            config_files=with_scheduler(shared_files(root, index), profile),
            weights=weights,
        )

    @classmethod
    def _task(cls, denoiser_config: Mapping[str, Any]) -> str:
        inpainting = denoiser_config.get("in_channels", 4) == cls.inpainting_channels
        return INPAINTING if inpainting else TEXT_TO_IMAGE

    @classmethod
    def _dims(
        cls, height: int, width: int, factor: int, denoiser_config: Mapping[str, Any]
    ) -> dict[str, int]:
        return {
            "height": height,
            "width": width,
            "latent_height": height // factor,
            "latent_width": width // factor,
        }

    @classmethod
    def _sequences(cls, root: Path) -> dict[str, int]:
        """Each text encoder's token count: CLIP's from its tokenizer folder, T5's what the
        family's diffusers pipelines encode."""
        return {
            encoder: (
                cls.t5_sequence_length
                if encoder == cls.t5_encoder
                else tokenizer_length(root / tokenizer)
            )
            for encoder, tokenizer in cls.tokenizer_folders.items()
        }

    @classmethod
    def _model_info(
        cls,
        root: Path,
        index: Mapping[str, Any],
        denoiser_config: Mapping[str, Any],
        sequences: Mapping[str, int],
    ) -> dict[str, Any]:
        """What the family's pipeline reads besides the shared facts."""
        text_config = read_config(root / "text_encoder")
        return {
            "unet_in_channels": denoiser_config.get("in_channels", 4),
            "text_hidden_layers": text_config.get("num_hidden_layers"),
            "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True),
            "requires_aesthetics_score": index.get("requires_aesthetics_score", False),
        }

    @classmethod
    def _check_step_cache(
        cls, root: Path, denoiser_config: Mapping[str, Any], profile: Profile
    ) -> None:
        """A denoiser the profile's step cache can split (DeepCache's for UNets)."""
        if profile.model.deep_cache:
            check_deep_cache(root, denoiser_config)

    @classmethod
    def _step_cache_components(cls, profile: Profile) -> list[tuple[str, str]]:
        """(name, folder) of what the profile's step cache adds after the denoiser: the
        shallow UNet (DeepCache), from the UNet's folder."""
        return [(SHALLOW_UNET, cls.denoiser)] if profile.model.deep_cache else []

    @classmethod
    def _step_cache_signature(
        cls,
        name: str,
        config: Mapping[str, Any],
        inputs: dict[str, TensorSpec],
        outputs: dict[str, TensorSpec],
        profile: Profile,
    ) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        """A component's inputs and outputs with what its step cache passes between them:
        DeepCache's UNet also outputs its deep features (the shallow UNet's are in
        _signature)."""
        if profile.model.deep_cache and name == "unet":
            return inputs, {**outputs, DEEP_FEATURES: deep_features_spec(config)}
        return inputs, outputs

    @classmethod
    def _component_folders(
        cls, root: Path, cache: Sequence[tuple[str, str]] = ()
    ) -> list[tuple[str, str]]:
        """The text encoders the pipeline has (SD3 may lack T5, and runs with zeros in its
        place; the required ones were checked), each with its tokenizer, then the rest (the
        step cache's `cache` components after the denoiser, from their folders)."""
        present = [encoder for encoder in cls.tokenizer_folders if (root / encoder).is_dir()]
        for encoder in present:
            tokenizer = cls.tokenizer_folders[encoder]
            if not (root / tokenizer).is_dir():
                raise SourceError(
                    f"{root} has {encoder}/ but no {tokenizer}/: the pipeline's text encoders "
                    "need their tokenizers; save the pipeline with them"
                )
        text = [(encoder, encoder) for encoder in present]
        # A ControlNet pipeline's ControlNets (a MultiControlNetModel saves controlnet,
        # controlnet_1, ...) run before the denoiser, on the same inputs.
        folders = {path.name for path in root.iterdir() if path.is_dir()}
        control = [(name, name) for name in controlnet_names(folders)]
        denoisers = [(cls.denoiser, cls.denoiser), *cache]
        return [*text, *control, *denoisers, ("vae_encoder", "vae"), ("vae_decoder", "vae")]

    @classmethod
    def _component(
        cls,
        name: str,
        folder: Path,
        files: list[Path],
        pickle: bool,
        dims: Mapping[str, int],
        sequences: Mapping[str, int],
        profile: Profile,
    ) -> ComponentSpec:
        from modelkiln.models import stable_diffusion_modules as modules

        config = read_config(folder)
        inputs, outputs = cls._signature(name, config, sequences, dims)
        inputs, outputs = cls._step_cache_signature(name, config, inputs, outputs, profile)
        deep_cache = profile.model.deep_cache > 0
        block_cache = profile.model.first_block_cache > 0
        # A ControlNet pipeline's UNet also takes the ControlNet's residuals.
        controlled = name == "unet" and (folder.parent / CONTROLNET).is_dir()
        if controlled:
            lh, lw = dims["latent_height"], dims["latent_width"]
            inputs = {**inputs, **controlnet_residuals(config, lh, lw)}
        safetensors = tuple(f for f in files if f.suffix == ".safetensors")
        family, kind = cls.name, TEXT_ENCODERS[cls.name].get(name)
        merging = profile.model.token_merging_ratio if name in (cls.denoiser, SHALLOW_UNET) else 0

        def wrapped(model: torch.nn.Module, merge: float = merging) -> torch.nn.Module:
            return modules.wrap(
                name,
                model,
                family,
                kind,
                controlled=controlled,
                deep_cache=deep_cache,
                block_cache=block_cache,
                token_merging=merge,
            )

        return ComponentSpec(
            name=name,
            module=lambda: wrapped(modules.load_component(folder, pickle=pickle)),
            meta_module=lambda: wrapped(modules.meta_component(folder)),
            # The end-to-end gate's reference runs the UNet with every token.
            exact_module=(
                (lambda: wrapped(modules.load_component(folder, pickle=pickle), 0.0))
                if merging
                else None
            ),
            checkpoint=safetensors,
            inputs=inputs,
            outputs=outputs,
            save_reference=lambda out: save_reference(folder, files, pickle, out),
            path=name,
            reference_path=folder.name,
            atol=ATOL.get(CONTROLNET if is_controlnet(name) else name, VAE_ATOL),
            batch_factor=(
                cls.denoiser_batch_factor
                if name in (cls.denoiser, SHALLOW_UNET, TRANSFORMER_HEAD) or is_controlnet(name)
                else 1
            ),
            default_dims=dict(dims),
            config_file=component_config(name, config, kind),
        )

    @classmethod
    def _signature(
        cls,
        name: str,
        config: Mapping[str, Any],
        sequences: Mapping[str, int],
        dims: Mapping[str, int],
    ) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        kind = TEXT_ENCODERS[cls.name].get(name)
        if kind is not None:
            return text_encoder_signature(kind, config, sequences[name])
        if name == "unet":
            return unet_signature(config, sequences["text_encoder"], cls.xl)
        if name == SHALLOW_UNET:
            inputs, outputs = unet_signature(config, sequences["text_encoder"], cls.xl)
            return {**inputs, DEEP_FEATURES: deep_features_spec(config)}, outputs
        if is_controlnet(name):
            return controlnet_signature(config, sequences["text_encoder"], dims, cls.xl)
        return vae_signature(name, config)

    @classmethod
    def reference_module(
        cls, model_dir: Path, component: str, settings: Mapping[str, Any]
    ) -> torch.nn.Module:
        from modelkiln.models import stable_diffusion_modules as modules

        model = modules.load_component(model_dir, pickle=False)
        # A ControlNet artifact's UNet takes the residuals (its ControlNet lies beside it).
        controlled = component == "unet" and (model_dir.parent / CONTROLNET).is_dir()
        kind = TEXT_ENCODERS[cls.name].get(component)
        return modules.wrap(
            component,
            model,
            cls.name,
            kind,
            controlled=controlled,
            deep_cache=bool(settings.get("deep_cache")),
            block_cache=bool(settings.get("first_block_cache")),
            token_merging=float(settings.get("token_merging_ratio") or 0.0),
        )

    @classmethod
    def pipeline_for(cls, task: str) -> str:
        (name,) = cls.pipelines  # text-to-image and inpainting share one pipeline
        return name


class StableDiffusionXLFamily(StableDiffusionFamily):
    name: ClassVar[str] = "sdxl"
    summary: ClassVar[str] = (
        "diffusers StableDiffusionXLPipeline / Img2Img / Inpaint directories (SDXL)"
    )
    xl: ClassVar[bool] = True
    tokenizer_folders: ClassVar[Mapping[str, str]] = {
        "text_encoder": "tokenizer",
        "text_encoder_2": "tokenizer_2",
    }
    required_folders: ClassVar[tuple[str, ...]] = (
        *StableDiffusionFamily.required_folders,
        "text_encoder_2",
        "tokenizer_2",
    )
    pipelines: ClassVar[Mapping[str, str]] = {
        "stable-diffusion-xl": "modelkiln.pipelines.sdxl:SDXLPipeline"
    }
    bundle_configs: ClassVar[tuple[str, ...]] = (
        *StableDiffusionFamily.bundle_configs,
        "tokenizer_2/",
    )


def _resolution(
    profile: Profile, denoiser_config: Mapping[str, Any], factor: int, default_sample_size: int
) -> tuple[int, int]:
    native = int(denoiser_config.get("sample_size") or default_sample_size) * factor
    height = profile.shapes.height or native
    width = profile.shapes.width or native
    for key, value in (("height", height), ("width", width)):
        if value % factor:
            raise ProfileError(
                f"shapes.{key} = {value} is not a multiple of this VAE's scale factor {factor}"
            )
    return height, width
