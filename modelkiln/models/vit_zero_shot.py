"""Zero-shot image classification with a whole CLIP model (model.task =
"zero-shot-image-classification"): two components, `vision_model` (pixel_values ->
image_embeds, last_hidden_state) and `text_model` (input_ids -> text_embeds,
last_hidden_state), with the CLIP tokenizer in `tokenizer/` and CLIP's learned logit scale in
kiln.json, so that the torch-free pipeline scores images against any labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.errors import ProfileError, SourceError, UnsupportedError
from modelkiln.models.base import LoadedModel
from modelkiln.sources import ResolvedSource, find_weights, weights_digest
from modelkiln.specs import ComponentSpec, TensorSpec

if TYPE_CHECKING:
    from modelkiln.preprocess import ImagePreprocessor

ZERO_SHOT = "zero-shot-image-classification"
VISION, TEXT = "vision_model", "text_model"
# The tokenizer files a CLIP repository keeps at its root; the pipeline reads tokenizer/.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
)
FP32_ATOL = 1e-4


def load_zero_shot(
    family: str,
    source: ResolvedSource,
    config: dict[str, Any],
    preprocessor_for: Any,
    hidden_layers: tuple[int, ...] = (),
) -> LoadedModel:
    """Both towers of the CLIPModel in `source` as components; `preprocessor_for(model,
    image_size)` is the family's image preprocessing of the vision tower."""
    from modelkiln.models import vit_modules

    architecture = (config.get("architectures") or [""])[0]
    if config.get("model_type") != "clip" or architecture not in ("CLIPModel", ""):
        raise UnsupportedError(
            f"{source.spec}: zero-shot classification needs a whole CLIP model (CLIPModel, "
            f"both towers); this is a '{config.get('model_type')}' {architecture or 'model'}"
        )
    if hidden_layers:
        raise ProfileError(
            "model.hidden_layers does not apply to zero-shot classification (it scores the "
            "projected embeddings); build the vision tower for embeddings to export them"
        )
    root = source.local_dir
    weights = find_weights(root, allow_pickle=False)
    vision = vit_modules.load_transformers(root, "CLIPModel", pickle=False)
    text = vit_modules.load_clip_text(root)
    vision_module = vit_modules.HFFeatures(vision, ())
    text_module = vit_modules.ClipTextEmbeds(text)
    tokenizer = _tokenizer_files(root)
    length = _sequence_length(tokenizer, text.config.max_position_embeddings)
    size = vision.config.image_size
    image_size = list(size) if isinstance(size, list | tuple) else [size, size]
    preprocessor: ImagePreprocessor = preprocessor_for(vision, image_size)
    projection = int(text.config.projection_dim)
    hidden = int(text.config.hidden_size)
    vision_spec = ComponentSpec(
        name=VISION,
        module=lambda: vision_module,
        inputs={"pixel_values": TensorSpec("float32", ("batch", 3, *image_size))},
        outputs={
            name: TensorSpec("float32", ("batch", *shape))
            for name, shape in vision_module.output_shapes.items()
        },
        save_reference=lambda out: vit_modules.save_transformers(vision, out),
        path=VISION,
        atol=FP32_ATOL,
    )
    ids = TensorSpec("int64", ("batch", length), value_range=(0, text.config.vocab_size))
    text_spec = ComponentSpec(
        name=TEXT,
        module=lambda: text_module,
        inputs={"input_ids": ids},
        outputs={
            "text_embeds": TensorSpec("float32", ("batch", projection)),
            "last_hidden_state": TensorSpec("float32", ("batch", length, hidden)),
        },
        save_reference=lambda out: vit_modules.save_transformers(text, out),
        path=TEXT,
        atol=FP32_ATOL,
    )
    return LoadedModel(
        family=family,
        task=ZERO_SHOT,
        pipeline=ZERO_SHOT,
        components=[vision_spec, text_spec],
        model_info={
            "library": "transformers",
            "architecture": "CLIPModel",
            "image_size": image_size,
            "hidden_size": vision.config.hidden_size,
            "num_layers": vision.config.num_hidden_layers,
            "num_prefix_tokens": 1,
            "labels": None,
            "sequence_length": length,
            "logit_scale": _logit_scale(weights),
            "preprocessing": preprocessor.to_dict(),
        },
        config_files={
            "config.json": (root / "config.json").read_bytes(),
            **{f"tokenizer/{name}": data for name, data in tokenizer.items()},
        },
        weights=weights_digest(weights),
    )


def reference_module(model_dir: Path, component: str) -> Any:
    """A tower saved by save_reference, wrapped as it was exported."""
    from modelkiln.models import vit_modules

    if component == TEXT:
        return vit_modules.ClipTextEmbeds(vit_modules.load_clip_text(model_dir))
    model = vit_modules.load_transformers(model_dir, "CLIPVisionModelWithProjection", pickle=False)
    return vit_modules.HFFeatures(model, ())


def _tokenizer_files(root: Path) -> dict[str, bytes]:
    files = {
        name: (root / name).read_bytes() for name in TOKENIZER_FILES if (root / name).is_file()
    }
    if "tokenizer_config.json" not in files or "vocab.json" not in files:
        raise SourceError(
            f"{root} has no CLIP tokenizer (tokenizer_config.json, vocab.json, merges.txt): "
            "zero-shot classification tokenizes the labels; save the model with its processor"
        )
    return files


def _sequence_length(tokenizer: dict[str, bytes], positions: int) -> int:
    """The tokenizer's padded length, within the text tower's positions (CLIP: 77)."""
    config = json.loads(tokenizer["tokenizer_config.json"])
    length = config.get("model_max_length")
    if not isinstance(length, int) or length > positions:
        return int(positions)
    return length


def _logit_scale(weights: list[Path]) -> float:
    """exp(logit_scale): CLIP's learned temperature, as CLIPModel multiplies by it."""
    import math

    from safetensors import safe_open

    for file in weights:
        with safe_open(str(file), framework="numpy") as tensors:
            if "logit_scale" in tensors.keys():  # noqa: SIM118 - safe_open is not a dict
                return float(math.exp(float(tensors.get_tensor("logit_scale"))))
    raise SourceError("the CLIP checkpoint has no logit_scale; save the whole CLIPModel")
