"""Stable Diffusion 1.x/2.x (family "sd") and SDXL (family "sdxl"), inpainting variants included.

Components and IO follow optimum's diffusion exports, so that optimum's ORT/OV pipelines load
what we build: text_encoder [, text_encoder_2], unet (sample, timestep, encoder_hidden_states
[, text_embeds, time_ids] -> out_sample), vae_encoder (sample -> latent_parameters) and
vae_decoder (latent_sample -> sample). Components load lazily, one at a time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.errors import ProfileError, SourceError, UnsupportedError
from modelkiln.models.base import PROMPTS, LoadedModel, ModelFamily
from modelkiln.sources import ResolvedSource, find_weights, weights_digest
from modelkiln.specs import ComponentSpec, TensorSpec

if TYPE_CHECKING:
    import torch

    from modelkiln.profiles import Profile

TEXT_TO_IMAGE = "text-to-image"
INPAINTING = "inpainting"
# diffusers pipeline classes -> (family, inpainting UNet expected)
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}
# Tolerances of an fp32 export against torch (optimum validates SD components with 1e-3).
ATOL = {"text_encoder": 1e-3, "text_encoder_2": 1e-3, "unet": 1e-3}
VAE_ATOL = 1e-3
TIMESTEPS = (0.0, 1000.0)
# Root files the artifact copies so that it runs without the source: optimum's layout.
SHARED_DIRS = ("scheduler", "tokenizer", "tokenizer_2")


class StableDiffusionFamily(ModelFamily):
    name: ClassVar[str] = "sd"
    summary: ClassVar[str] = (
        "diffusers StableDiffusionPipeline / Img2Img / Inpaint directories (SD 1.x, 2.x)"
    )
    xl: ClassVar[bool] = False  # SDXL's second text encoder and added conditioning
    tasks: ClassVar[tuple[str, ...]] = (TEXT_TO_IMAGE, INPAINTING)
    pipelines: ClassVar[Mapping[str, str]] = {
        "stable-diffusion": "modelkiln.pipelines.diffusion:SDPipeline"
    }
    real_inputs: ClassVar[str] = PROMPTS
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
    def export_spec(cls, spec: ComponentSpec, format: str) -> ComponentSpec:
        """OpenVINO GenAI (and optimum-intel) feed the UNet an int64 timestep of shape (1,):
        an OpenVINO UNet takes that, so OpenVINO GenAI runs the artifact as it is."""
        if format != "openvino" or spec.name != "unet":
            return spec
        timestep = TensorSpec("int64", (1,), value_range=TIMESTEPS)
        return replace(spec, inputs={**spec.inputs, "timestep": timestep})

    @classmethod
    def matches(cls, source: ResolvedSource) -> bool:
        index = source.read_json("model_index.json")
        return index is not None and PIPELINE_CLASSES.get(index.get("_class_name", "")) == cls.name

    @classmethod
    def load(cls, source: ResolvedSource, profile: Profile) -> LoadedModel:
        root = source.local_dir
        index = source.read_json("model_index.json") or {}
        if profile.model.task not in ("auto", TEXT_TO_IMAGE, INPAINTING):
            raise UnsupportedError(
                f"model.task '{profile.model.task}' does not apply to Stable Diffusion models; "
                "leave it 'auto'"
            )
        for folder in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            _require_dir(root, folder, source.spec)
        unet_config = _read_config(root / "unet")
        vae_config = _read_config(root / "vae")
        text_config = _read_config(root / "text_encoder")
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        height, width = _resolution(profile, unet_config, factor)
        sequence = _tokenizer_length(root / "tokenizer")
        inpainting = unet_config.get("in_channels", 4) == 9
        dims = {
            "height": height,
            "width": width,
            "latent_height": height // factor,
            "latent_width": width // factor,
        }
        weights: dict[str, str] = {}
        components = []
        for name, folder in cls._component_folders():
            files = _weights(root / folder, source.allow_pickle)
            weights.update({f"{folder}/{k}": v for k, v in weights_digest(files).items()})
            components.append(
                cls._component(name, root / folder, files, source.allow_pickle, dims, sequence)
            )
        if cls.xl:
            _require_dir(root, "text_encoder_2", source.spec)
            _require_dir(root, "tokenizer_2", source.spec)
        latent_channels = vae_config.get("latent_channels", 4)
        task = INPAINTING if inpainting else TEXT_TO_IMAGE
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
                "latent_channels": latent_channels,
                "unet_in_channels": unet_config.get("in_channels", 4),
                "sequence_length": sequence,
                "text_hidden_layers": text_config.get("num_hidden_layers"),
                "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True),
                "requires_aesthetics_score": index.get("requires_aesthetics_score", False),
                "dynamic_resolution": profile.shapes.dynamic_resolution,
            },
            config_files=_shared_files(root, index),
            weights=weights,
        )

    @classmethod
    def _component_folders(cls) -> list[tuple[str, str]]:
        text = [("text_encoder", "text_encoder")]
        if cls.xl:
            text.append(("text_encoder_2", "text_encoder_2"))
        return [*text, ("unet", "unet"), ("vae_encoder", "vae"), ("vae_decoder", "vae")]

    @classmethod
    def _component(
        cls,
        name: str,
        folder: Path,
        files: list[Path],
        pickle: bool,
        dims: Mapping[str, int],
        sequence: int,
    ) -> ComponentSpec:
        from modelkiln.models import stable_diffusion_modules as modules

        config = _read_config(folder)
        inputs, outputs = _signature(name, config, sequence, cls.xl, dims)
        safetensors = tuple(f for f in files if f.suffix == ".safetensors")
        return ComponentSpec(
            name=name,
            module=lambda: modules.wrap(
                name, modules.load_component(folder, pickle=pickle), cls.xl
            ),
            meta_module=lambda: modules.wrap(name, modules.meta_component(folder), cls.xl),
            checkpoint=safetensors,
            inputs=inputs,
            outputs=outputs,
            save_reference=lambda out: _save_reference(folder, files, pickle, out),
            path=name,
            reference_path=folder.name,
            atol=ATOL.get(name, VAE_ATOL),
            batch_factor=2 if name == "unet" else 1,
            default_dims=dict(dims),
            config_file=_component_config(name, config, cls.xl),
        )

    @classmethod
    def reference_module(
        cls, model_dir: Path, component: str, settings: Mapping[str, Any]
    ) -> torch.nn.Module:
        from modelkiln.models import stable_diffusion_modules as modules

        return modules.wrap(component, modules.load_component(model_dir, pickle=False), cls.xl)

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
    pipelines: ClassVar[Mapping[str, str]] = {
        "stable-diffusion-xl": "modelkiln.pipelines.diffusion:SDXLPipeline"
    }
    bundle_configs: ClassVar[tuple[str, ...]] = (
        *StableDiffusionFamily.bundle_configs,
        "tokenizer_2/",
    )


def _signature(
    name: str, config: Mapping[str, Any], sequence: int, xl: bool, dims: Mapping[str, int]
) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """Inputs and outputs with optimum's names; output dims are expressions of input dims."""
    if name.startswith("text_encoder"):
        hidden = config["hidden_size"]
        ids = TensorSpec("int64", ("batch", sequence), value_range=(0, config["vocab_size"]))
        tokens = TensorSpec("float32", ("batch", sequence, hidden))
        states = {f"hidden_states.{i}": tokens for i in range(config["num_hidden_layers"] + 1)}
        if name == "text_encoder_2":
            pooled = TensorSpec("float32", ("batch", config["projection_dim"]))
            return {"input_ids": ids}, {
                "text_embeds": pooled,
                "last_hidden_state": tokens,
                **states,
            }
        outputs = {
            "last_hidden_state": tokens,
            "pooler_output": TensorSpec("float32", ("batch", hidden)),
        }
        return {"input_ids": ids}, {**outputs, **(states if xl else {})}
    if name == "unet":
        latent = ("latent_height", "latent_width")
        inputs = {
            "sample": TensorSpec("float32", ("batch", config["in_channels"], *latent)),
            "timestep": TensorSpec("float32", (), value_range=TIMESTEPS),
            "encoder_hidden_states": TensorSpec(
                "float32", ("batch", sequence, _cross_attention_dim(config))
            ),
        }
        if xl:
            pooled = (
                config["projection_class_embeddings_input_dim"]
                - 6 * config["addition_time_embed_dim"]
            )
            inputs["text_embeds"] = TensorSpec("float32", ("batch", pooled))
            inputs["time_ids"] = TensorSpec("float32", ("batch", 6), value_range=(0, 1024))
        outputs = {"out_sample": TensorSpec("float32", ("batch", config["out_channels"], *latent))}
        return inputs, outputs
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    channels = config.get("latent_channels", 4)
    if name == "vae_encoder":
        pixels = TensorSpec("float32", ("batch", 3, "height", "width"), value_range=(-1.0, 1.0))
        moments = TensorSpec(
            "float32", ("batch", 2 * channels, f"height / {factor}", f"width / {factor}")
        )
        return {"sample": pixels}, {"latent_parameters": moments}
    latents = TensorSpec("float32", ("batch", channels, "latent_height", "latent_width"))
    image = TensorSpec(
        "float32", ("batch", 3, f"latent_height * {factor}", f"latent_width * {factor}")
    )
    return {"latent_sample": latents}, {"sample": image}


def _cross_attention_dim(config: Mapping[str, Any]) -> int:
    dim = config["cross_attention_dim"]
    return int(dim[0] if isinstance(dim, list | tuple) else dim)


def _component_config(name: str, config: Mapping[str, Any], xl: bool) -> bytes:
    """The config.json optimum keeps beside each exported component."""
    data = dict(config)
    if name.startswith("text_encoder"):
        data["export_model_type"] = (
            "clip-text-with-projection" if name == "text_encoder_2" else "clip-text"
        )
        if xl:
            data["output_hidden_states"] = True
    return (json.dumps(data, indent=2) + "\n").encode()


def _resolution(profile: Profile, unet_config: Mapping[str, Any], factor: int) -> tuple[int, int]:
    native = int(unet_config.get("sample_size", 64)) * factor
    height = profile.shapes.height or native
    width = profile.shapes.width or native
    for key, value in (("height", height), ("width", width)):
        if value % factor:
            raise ProfileError(
                f"shapes.{key} = {value} is not a multiple of this VAE's scale factor {factor}"
            )
    return height, width


def _tokenizer_length(directory: Path) -> int:
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    length = config.get("model_max_length", 77)
    # Tokenizers without a limit store a huge sentinel; CLIP's position embeddings stop at 77.
    return int(length) if length and length < 100_000 else 77


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as error:
        raise SourceError(f"{path} is missing: the pipeline directory is incomplete") from error
    except json.JSONDecodeError as error:
        raise SourceError(f"{path} is not valid JSON ({error})") from error


def _require_dir(root: Path, folder: str, spec: str) -> None:
    if not (root / folder).is_dir():
        raise SourceError(
            f"{spec} has no {folder}/ folder: a diffusers pipeline directory needs unet/, vae/, "
            "text_encoder/, tokenizer/ and scheduler/ (SDXL also text_encoder_2/, tokenizer_2/)"
        )


def _shared_files(root: Path, index: Mapping[str, Any]) -> dict[str, bytes]:
    """model_index.json, scheduler and tokenizers: what running needs besides the models."""
    files: dict[str, bytes] = {}
    cleaned = dict(index)
    # Pieces we do not build would make optimum look for folders that are not there.
    for key in ("feature_extractor", "safety_checker", "image_encoder"):
        if key in cleaned:
            cleaned[key] = [None, None]
    files["model_index.json"] = (json.dumps(cleaned, indent=2) + "\n").encode()
    for folder in SHARED_DIRS:
        for path in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
            if path.is_file():
                files[f"{folder}/{path.name}"] = path.read_bytes()
        tokenizer_json = files.get(f"{folder}/tokenizer.json")
        if tokenizer_json is not None and f"{folder}/vocab.json" not in files:
            for name, content in _bpe_vocabulary_files(tokenizer_json).items():
                files[f"{folder}/{name}"] = content
    return files


def _bpe_vocabulary_files(tokenizer_json: bytes) -> dict[str, bytes]:
    """vocab.json + merges.txt from a BPE tokenizer.json. transformers 5 saves only the
    latter; CLIPTokenizer in transformers 4 (which optimum pins) needs the former."""
    model = json.loads(tokenizer_json).get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model:
        return {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "vocab.json": json.dumps(model["vocab"], ensure_ascii=False).encode(),
        "merges.txt": "\n".join(["#version: 0.2", *merges, ""]).encode(),
    }


def _save_reference(folder: Path, files: list[Path], pickle: bool, out: Path) -> None:
    """The diffusers layout: safetensors copied as they are; pickle weights converted."""
    out.mkdir(parents=True, exist_ok=True)
    if not pickle or all(f.suffix == ".safetensors" for f in files):
        shutil.copyfile(folder / "config.json", out / "config.json")
        for path in files:
            shutil.copyfile(path, out / path.name)
        return
    from modelkiln.models.stable_diffusion_modules import load_component

    load_component(folder, pickle=True).save_pretrained(out, safe_serialization=True)


def _weights(folder: Path, allow_pickle: bool) -> list[Path]:
    """A component's weights, preferring the default files over variants (.fp16.safetensors)."""
    files = find_weights(folder, allow_pickle=allow_pickle)
    default = [f for f in files if len(f.name.split(".")) == 2]
    if default:
        return default
    raise SourceError(
        f"{folder} has only variant weights ({', '.join(f.name for f in files)}); modelkiln "
        "builds from the default fp32 files: fetch them (without a variant) and retry"
    )
