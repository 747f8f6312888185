"""Vision Transformers and the encoders built like them, from transformers (ViT, DeiT,
DINOv2 with and without registers, the vision towers of CLIP and SigLIP) and timm.

One component, `vision_model`, stored at the artifact root as optimum does for ViT:
`pixel_values` -> `logits` (image-classification) or [`image_embeds` (CLIP)] +
`last_hidden_state` [+ `pooler_output`] [+ `hidden_state_<k>`] (image-feature-extraction).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.errors import ProfileError, UnsupportedError
from modelkiln.models import vit_zero_shot
from modelkiln.models.base import LoadedModel, ModelFamily
from modelkiln.models.vit_zero_shot import ZERO_SHOT
from modelkiln.pipelines.base import APPROXIMATIONS
from modelkiln.preprocess import ImagePreprocessor
from modelkiln.sources import ResolvedSource, find_weights, weights_digest
from modelkiln.specs import ComponentSpec, TensorSpec

if TYPE_CHECKING:
    import torch

    from modelkiln.profiles import ModelSettings, Profile
    from modelkiln.records import Manifest

COMPONENT = "vision_model"
# model_type -> the architecture a config without `architectures` is loaded as.
TRANSFORMERS_MODEL_TYPES = {
    "vit": "ViTModel",
    "deit": "DeiTModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "clip": "CLIPModel",  # the vision tower of the two-tower model
    "siglip": "SiglipModel",
}
CLASSIFICATION = "image-classification"
FEATURES = "image-feature-extraction"
# optimum validates ViT exports with 1e-4 (ATOL_FOR_VALIDATION); we keep the same bound.
FP32_ATOL = 1e-4


def _library(config: Mapping[str, Any]) -> str | None:
    if config.get("model_type") in TRANSFORMERS_MODEL_TYPES:
        return "transformers"
    if "architecture" in config and "pretrained_cfg" in config:
        return "timm"
    return None


class ViTFamily(ModelFamily):
    name = "vit"
    summary = (
        "transformers ViT, DeiT, DINOv2 (with registers), CLIP and SigLIP vision encoders "
        "(classifiers and backbones), and timm VisionTransformer models (timm:NAME, "
        "hf-hub:timm/NAME or a local timm directory)"
    )
    tasks = (CLASSIFICATION, FEATURES, ZERO_SHOT)
    pipelines: ClassVar[Mapping[str, str]] = {
        CLASSIFICATION: "modelkiln.pipelines.classification:ImageClassificationPipeline",
        FEATURES: "modelkiln.pipelines.embedding:ImageEmbeddingPipeline",
        ZERO_SHOT: "modelkiln.pipelines.zero_shot:ZeroShotImageClassificationPipeline",
    }
    # The pipelines read preprocessing and labels from kiln.json; config.json and
    # preprocessor_config.json are what optimum's ORT/OV classes load.
    bundle_configs = ("config.json", "preprocessor_config.json", "tokenizer/")
    merges_tokens = True
    # ToMe's setting for ViT-B/16 at 224 (197 tokens): 8 per block, 96 by the last.
    tuning_knobs = ("model.token_merging=8",)
    usage: ClassVar[Mapping[str, str]] = {
        CLASSIFICATION: "kiln classify {bundle} IMAGE.png",
        FEATURES: "kiln embed {bundle} IMAGE.png -o vectors.npy",
        ZERO_SHOT: 'kiln classify {bundle} IMAGE.png --labels "a cat,a dog"',
    }

    @classmethod
    def matches(cls, source: ResolvedSource) -> bool:
        config = source.read_json("config.json")
        return config is not None and _library(config) is not None

    @classmethod
    def app_notes(cls, manifest: Manifest, files: Collection[str]) -> str:
        """The preprocessing that makes pixel_values, and what the outputs index."""
        from modelkiln.models.app_notes import vision_notes

        return vision_notes(manifest, files)

    @classmethod
    def load(cls, source: ResolvedSource, profile: Profile) -> LoadedModel:
        from modelkiln.models import vit_modules

        settings = profile.model
        config = source.read_json("config.json") or {}
        library = _library(config)
        if library is None:
            raise UnsupportedError(f"{source.spec} is not a transformers or timm ViT")
        if settings.task == ZERO_SHOT:
            return vit_zero_shot.load_zero_shot(
                cls.name,
                source,
                config,
                lambda model, size: _preprocessor(source, model, "transformers", size),
                settings.hidden_layers,
            )
        weights = find_weights(source.local_dir, allow_pickle=source.allow_pickle)
        pickle = not weights[0].name.endswith(".safetensors")
        if library == "transformers":
            architecture = _architecture(config)
            model = vit_modules.load_transformers(source.local_dir, architecture, pickle=pickle)
            has_head = vit_modules.is_classifier(architecture)
        else:
            model = vit_modules.load_timm(source.local_dir)
            has_head = model.num_classes > 0
        task = _resolve_task(settings.task, has_head, source.spec)
        facts = _model_facts(model, library, config)
        _check_hidden_layers(settings.hidden_layers, facts["num_layers"])
        exact = vit_modules.wrap(model, library, task, settings.hidden_layers)
        module = _merging(exact, model, task, facts, settings)
        preprocessor = _preprocessor(source, model, library, facts["image_size"])
        spec = ComponentSpec(
            name=COMPONENT,
            module=lambda: module,
            inputs={"pixel_values": TensorSpec("float32", ("batch", 3, *facts["image_size"]))},
            outputs=_outputs(task, facts, module, settings.hidden_layers),
            save_reference=lambda out: _save_reference(model, library, source, out),
            atol=FP32_ATOL,
            exact_module=None if module is exact else lambda: exact,
        )
        return LoadedModel(
            family=cls.name,
            task=task,
            pipeline=cls.pipeline_for(task),
            components=[spec],
            model_info={
                **facts,
                "preprocessing": preprocessor.to_dict(),
                **(
                    {APPROXIMATIONS: {"token_merging": settings.token_merging}}
                    if settings.token_merging
                    else {}
                ),
            },
            config_files=_config_files(source, library, facts["labels"], preprocessor),
            weights=weights_digest(weights),
        )

    @classmethod
    def reference_module(
        cls, model_dir: Path, component: str, settings: Mapping[str, Any]
    ) -> torch.nn.Module:
        from modelkiln.models import vit_modules

        if settings.get("task") == ZERO_SHOT:
            return vit_zero_shot.reference_module(model_dir, component)
        if component != COMPONENT:
            raise UnsupportedError(f"the vit family has no component '{component}'")
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        if _library(config) == "transformers":
            architecture = _architecture(config)
            model = vit_modules.load_transformers(model_dir, architecture, pickle=False)
            library = "transformers"
        else:
            model, library = vit_modules.load_timm(model_dir), "timm"
        hidden_layers = tuple(settings.get("hidden_layers", ()))
        return vit_modules.wrap(model, library, settings["task"], hidden_layers)

    @classmethod
    def pipeline_for(cls, task: str) -> str:
        return task  # one pipeline per task, named after it


def _merging(
    exact: Any, model: Any, task: str, facts: Mapping[str, Any], settings: ModelSettings
) -> Any:
    """The export wrapper with [model] token_merging's hooks on the model's blocks, or
    `exact` itself without merging."""
    from modelkiln.models.token_merging import Merged, TokenMerging, transformer_blocks

    if not settings.token_merging:
        return exact
    if task != CLASSIFICATION or settings.hidden_layers:
        raise UnsupportedError(
            "model.token_merging applies to image classification without model.hidden_layers: "
            "merged tokens would leave the other outputs with fewer tokens than the model's"
        )
    blocks = transformer_blocks(model, facts["num_layers"])
    merging = TokenMerging(blocks, settings.token_merging, facts["num_prefix_tokens"])
    return Merged(exact, merging).eval()


def _architecture(config: Mapping[str, Any]) -> str:
    default = TRANSFORMERS_MODEL_TYPES[str(config.get("model_type"))]
    return str((config.get("architectures") or [default])[0])


def _resolve_task(task: str, has_head: bool, spec: str) -> str:
    if task not in ("auto", CLASSIFICATION, FEATURES):
        raise UnsupportedError(
            f"model.task '{task}' does not apply to ViT models; use {CLASSIFICATION}, "
            f"{FEATURES} or (a whole CLIP model) {ZERO_SHOT}"
        )
    if task == "auto":
        return CLASSIFICATION if has_head else FEATURES
    if task == CLASSIFICATION and not has_head:
        raise UnsupportedError(
            f"{spec} has no classification head; build it with model.task = '{FEATURES}' "
            "(or leave task = 'auto')"
        )
    return task


def _check_hidden_layers(layers: tuple[int, ...], num_layers: int) -> None:
    wrong = [k for k in layers if not 1 <= k <= num_layers]
    if wrong:
        raise ProfileError(
            f"model.hidden_layers {wrong} out of range: this model has blocks 1..{num_layers}"
        )


def _model_facts(model: Any, library: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Sizes, labels and token layout the torch-free pipelines need."""
    if library == "transformers":
        from modelkiln.models.vit_modules import is_classifier

        size = model.config.image_size
        image_size = list(size) if isinstance(size, list | tuple) else [size, size]
        classifier = is_classifier(type(model).__name__)
        return {
            "library": library,
            "architecture": type(model).__name__,
            "image_size": image_size,
            "hidden_size": model.config.hidden_size,
            "num_layers": model.config.num_hidden_layers,
            "num_prefix_tokens": _prefix_tokens(model.config),
            "labels": _hf_labels(model.config.id2label) if classifier else None,
        }
    return {
        "library": library,
        "architecture": str(config.get("architecture")),
        "image_size": list(model.patch_embed.img_size),
        "hidden_size": model.embed_dim,
        "num_layers": len(model.blocks),
        "num_prefix_tokens": model.num_prefix_tokens,
        "labels": _timm_labels(model, config) if model.num_classes > 0 else None,
    }


def _prefix_tokens(config: Any) -> int:
    """Tokens before the patches: DeiT's class and distillation tokens, DINOv2's class token
    and registers, none for SigLIP (it pools with attention), the class token otherwise."""
    model_type = config.model_type
    if model_type == "deit":
        return 2
    if model_type == "siglip_vision_model":
        return 0
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def _hf_labels(id2label: Mapping[Any, str]) -> list[str]:
    return [id2label[k] for k in sorted(id2label, key=int)]


def _timm_labels(model: Any, config: Mapping[str, Any]) -> list[str]:
    names = config.get("label_names") or config.get("pretrained_cfg", {}).get("label_names")
    if names and len(names) == model.num_classes:
        return list(names)
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset:
        return list(ImageNetInfo(subset).label_descriptions())
    return [f"LABEL_{i}" for i in range(model.num_classes)]


def _outputs(
    task: str, facts: Mapping[str, Any], module: Any, hidden_layers: tuple[int, ...]
) -> dict[str, TensorSpec]:
    if task == CLASSIFICATION:
        return {"logits": TensorSpec("float32", ("batch", len(facts["labels"])), is_logits=True)}
    if hasattr(module, "output_shapes"):  # transformers: what the encoder itself returned
        outputs = {
            name: TensorSpec("float32", ("batch", *shape))
            for name, shape in module.output_shapes.items()
        }
        tokens_and_width = module.output_shapes["last_hidden_state"]
        for k in hidden_layers:
            outputs[f"hidden_state_{k}"] = TensorSpec("float32", ("batch", *tokens_and_width))
        return outputs
    height, width = facts["image_size"]
    tokens = facts["num_prefix_tokens"] + (height // _patch(module)) * (width // _patch(module))
    hidden = facts["hidden_size"]
    outputs = {"last_hidden_state": TensorSpec("float32", ("batch", tokens, hidden))}
    if module.has_pooler:
        outputs["pooler_output"] = TensorSpec("float32", ("batch", hidden))
    for k in hidden_layers:
        outputs[f"hidden_state_{k}"] = TensorSpec("float32", ("batch", tokens, hidden))
    return outputs


def _patch(module: Any) -> int:
    patch = module.model.patch_embed.patch_size  # timm's
    return int(patch[0] if isinstance(patch, list | tuple) else patch)


def _preprocessor(
    source: ResolvedSource, model: Any, library: str, image_size: list[int]
) -> ImagePreprocessor:
    if library == "timm":
        from timm.data import resolve_data_config

        return ImagePreprocessor.from_timm_data_config(resolve_data_config({}, model=model))
    config = source.read_json("preprocessor_config.json") or {}
    height, width = image_size
    return ImagePreprocessor.from_hf_config(config, default_image_size=(height, width))


def _config_files(
    source: ResolvedSource, library: str, labels: list[str] | None, preprocessor: ImagePreprocessor
) -> dict[str, bytes]:
    """config.json (+ preprocessor_config.json) as optimum's ORT/OV classes load them."""
    config_path = source.local_dir / "config.json"
    if library == "timm":
        # optimum reads a timm directory through a plain PretrainedConfig: it needs the labels
        # at the top level, and its preprocessing comes from pretrained_cfg (no separate file).
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.pop("hf_hub_id", None)  # optimum-intel would query the hub for it, offline or not
        if labels:
            config["id2label"] = {str(i): label for i, label in enumerate(labels)}
            config["label2id"] = {label: i for i, label in enumerate(labels)}
        return {"config.json": (json.dumps(config, indent=2) + "\n").encode()}
    files = {"config.json": config_path.read_bytes()}
    existing = source.local_dir / "preprocessor_config.json"
    if existing.is_file():
        files["preprocessor_config.json"] = existing.read_bytes()
    else:
        text = json.dumps(preprocessor.to_hf_config(), indent=2) + "\n"
        files["preprocessor_config.json"] = text.encode()
    return files


def _save_reference(model: Any, library: str, source: ResolvedSource, out: Path) -> None:
    """Weights as safetensors plus the source's config, loadable by reference_module."""
    if library == "transformers":
        from modelkiln.models.vit_modules import save_transformers

        save_transformers(model, out)
        return
    from safetensors.torch import save_file

    (out / "config.json").write_bytes((source.local_dir / "config.json").read_bytes())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
