"""The encoders the vit family builds beyond ViT: DeiT, DINOv2 (with registers), CLIP's and
SigLIP's vision towers, from transformers, on ONNX Runtime and OpenVINO, each checked against
the model's own transformers class (not the wrapper modelkiln exports)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from modelkiln import load, open_artifact
from modelkiln.images import load_images

pytestmark = pytest.mark.torch

ENCODERS = ("deit-classifier", "dinov2-classifier", "dinov2-registers", "clip", "siglip-vision")
ROUND_TRIPS = [
    pytest.param("vit-onnxruntime-fp32", marks=pytest.mark.onnxruntime, id="onnx-ort"),
    pytest.param("vit-openvino-fp32", marks=pytest.mark.openvino, id="ir-ov"),
]
# source -> (outputs the artifact has, prefix tokens before the patches)
LAYOUT = {
    "deit-classifier": (["logits"], 2),
    "dinov2-classifier": (["logits"], 1),
    "dinov2-registers": (["last_hidden_state", "pooler_output"], 3),
    "clip": (["image_embeds", "last_hidden_state"], 1),
    "siglip-vision": (["last_hidden_state", "pooler_output"], 0),
}


def transformers_outputs(source: str, directory: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """What the model's own class returns for these pixels."""
    import torch
    import transformers as tf

    x = torch.from_numpy(pixels)
    with torch.inference_mode():
        if source == "deit-classifier":
            model = tf.DeiTForImageClassificationWithTeacher.from_pretrained(directory)
            return {"logits": model(pixel_values=x).logits.numpy()}
        if source == "dinov2-classifier":
            model = tf.Dinov2ForImageClassification.from_pretrained(directory)
            return {"logits": model(pixel_values=x).logits.numpy()}
        if source == "clip":
            clip = tf.CLIPModel.from_pretrained(directory)
            features = clip.get_image_features(pixel_values=x)
            embeds = features if isinstance(features, torch.Tensor) else features.pooler_output
            hidden = clip.vision_model(pixel_values=x).last_hidden_state
            return {"image_embeds": embeds.numpy(), "last_hidden_state": hidden.numpy()}
        model_class = (
            tf.Dinov2WithRegistersModel if source == "dinov2-registers" else tf.SiglipVisionModel
        )
        out = model_class.from_pretrained(directory)(pixel_values=x)
        return {
            "last_hidden_state": out.last_hidden_state.numpy(),
            "pooler_output": out.pooler_output.numpy(),
        }


@pytest.mark.parametrize("source", ENCODERS)
@pytest.mark.parametrize("profile", ROUND_TRIPS)
def test_encoder_round_trips_and_matches_its_transformers_class(
    source: str,
    profile: str,
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
    rgb_images: list[np.ndarray],
) -> None:
    import transformers
    from transformers import AutoImageProcessor

    artifact = built(source, profile)  # the build's gate passed
    outputs, prefix_tokens = LAYOUT[source]
    manifest = open_artifact(artifact).manifest
    assert manifest.model_info["num_prefix_tokens"] == prefix_tokens
    pipeline = load(artifact)
    assert list(pipeline.session.output_specs) == outputs

    # Preprocessing: the numpy one equals the source's transformers image processor (its PIL
    # backend, which the torchvision one approximates).
    images = load_images(rgb_images)
    pixels = pipeline.preprocessor(images)
    processor_class = type(AutoImageProcessor.from_pretrained(source_dir(source))).__name__
    processor = getattr(transformers, f"{processor_class}Pil").from_pretrained(source_dir(source))
    theirs = processor(images, return_tensors="np").pixel_values
    np.testing.assert_allclose(pixels, theirs, atol=1e-5, rtol=0)

    expected = transformers_outputs(source, source_dir(source), pixels)
    with pipeline:
        got = pipeline.session.run({"pixel_values": pixels})
    for name in outputs:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=0)

    with load(artifact) as runner:
        if "logits" in outputs:
            predictions = runner(rgb_images, top_k=3)
            assert [p[0].index for p in predictions] == list(expected["logits"].argmax(1))
            assert predictions[0][0].label == f"class_{expected['logits'][0].argmax()}"
        else:
            vectors = runner(rgb_images)
            pooled = expected["image_embeds" if source == "clip" else "pooler_output"]
            pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
            np.testing.assert_allclose(vectors, pooled, atol=1e-5, rtol=0)
            # mean pooling skips exactly the prefix tokens
            tokens = expected["last_hidden_state"][:, prefix_tokens:].mean(1)
            tokens = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
            np.testing.assert_allclose(runner(rgb_images, pooling="mean"), tokens, atol=1e-5)


def test_hidden_layers_of_a_clip_tower_are_exported(
    built: Callable[..., Path], source_dir: Callable[[str], Path], rgb_images: list[np.ndarray]
) -> None:
    import torch
    from transformers import CLIPModel

    artifact = built("clip", "vit-onnxruntime-fp32", "model.hidden_layers=[1]")
    with load(artifact) as pipeline:
        pixels = pipeline.preprocessor(load_images(rgb_images))
        got = pipeline.session.run({"pixel_values": pixels})["hidden_state_1"]
    clip = CLIPModel.from_pretrained(source_dir("clip"))
    with torch.inference_mode():
        hidden = clip.vision_model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    np.testing.assert_allclose(got, hidden.hidden_states[1].numpy(), atol=1e-4, rtol=0)
