"""The encoders the vit family builds beyond ViT: DeiT, DINOv2 (with registers), CLIP's and
SigLIP's vision towers, from transformers, on ONNX Runtime and OpenVINO, each checked against
the model's own transformers class (not the wrapper modelkiln exports)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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


ZERO_SHOT = "model.task=zero-shot-image-classification"
LABELS = ["a photo of a cat", "a dog", "the", "photo of"]


@pytest.mark.parametrize("profile", ROUND_TRIPS)
def test_zero_shot_clip_ranks_labels_as_transformers_clip_does(
    profile: str,
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
    rgb_images: list[np.ndarray],
    image_files: list[Path],
    kiln_main: Callable[..., Any],
) -> None:
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    artifact = built("clip", profile, ZERO_SHOT)
    manifest = open_artifact(artifact).manifest
    assert (manifest.task, list(manifest.components)) == (
        "zero-shot-image-classification",
        ["vision_model", "text_model"],
    )
    source = source_dir("clip")
    clip, tokenizer = CLIPModel.from_pretrained(source), CLIPTokenizer.from_pretrained(source)
    with load(artifact) as pipeline:
        pixels = pipeline.preprocessor(load_images(rgb_images))
        ours = pipeline.logits(rgb_images, LABELS)
        ranked = pipeline(rgb_images, labels=LABELS, top_k=2)
    ids = tokenizer(LABELS, padding="max_length", return_tensors="pt")
    with torch.inference_mode():
        theirs = clip(
            input_ids=ids.input_ids,
            attention_mask=ids.attention_mask,
            pixel_values=torch.from_numpy(pixels),
        ).logits_per_image.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    probabilities = torch.from_numpy(theirs).softmax(-1).numpy()
    for row, predictions in zip(probabilities, ranked, strict=True):
        assert [p.index for p in predictions] == list(np.argsort(-row)[:2])
        assert predictions[0].label == LABELS[int(row.argmax())]
        assert predictions[0].score == pytest.approx(float(row.max()), abs=1e-5)

    outcome = kiln_main(
        "classify", artifact, image_files[0], "--labels", ",".join(LABELS), "--json"
    )
    assert outcome.code == 0, outcome.err
    (result,) = __import__("json").loads(outcome.out)
    assert result["predictions"][0]["label"] == LABELS[int(probabilities[0].argmax())]


def test_zero_shot_mistakes_are_clear(
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
    image_files: list[Path],
    tmp_path: Path,
    kiln_main: Callable[..., Any],
) -> None:
    from modelkiln import build
    from modelkiln.errors import ProfileError, UnsupportedError

    zero_shot = built("clip", "vit-onnxruntime-fp32", ZERO_SHOT)
    classifier = built("deit-classifier", "vit-onnxruntime-fp32")
    cases = [
        ([zero_shot, image_files[0]], 'pass --labels "a cat,a dog"'),
        ([zero_shot, image_files[0], "--labels", " ,"], "at least one non-empty label"),
        ([classifier, image_files[0], "--labels", "a,b"], "--labels is for zero-shot"),
    ]
    for args, message in cases:
        outcome = kiln_main("classify", *args)
        assert outcome.code != 0 and len(outcome.err_lines) == 1, outcome.err
        assert message in outcome.err_lines[0]
    with pytest.raises(
        UnsupportedError, match=r"needs a whole CLIP model .*'dinov2_with_registers'"
    ):
        build(
            source_dir("dinov2-registers"),
            "vit-onnxruntime-fp32",
            tmp_path / "x",
            overrides=[ZERO_SHOT],
        )
    assert not (tmp_path / "x").exists()
    with pytest.raises(ProfileError, match=r"model\.hidden_layers does not apply to zero-shot"):
        build(
            source_dir("clip"),
            "vit-onnxruntime-fp32",
            tmp_path / "x",
            overrides=[ZERO_SHOT, "model.hidden_layers=[1]"],
        )
    assert not (tmp_path / "x").exists()
    import tarfile

    bundle = tmp_path / "clip.tar.gz"
    outcome = kiln_main("package", zero_shot, "--target", "linux-x86_64", "-o", bundle)
    assert outcome.code == 0, outcome.err
    with tarfile.open(bundle) as archive:
        names = archive.getnames()
    for needed in ("tokenizer/vocab.json", "vision_model/model.onnx", "text_model/model.onnx"):
        assert any(name.endswith(needed) for name in names), (needed, names)


# timm source -> prefix tokens (DeiT: class + distillation; DINOv2: class + 4 registers)
TIMM_ENCODERS = {"timm-deit-distilled": 2, "timm-dinov2-registers": 5, "timm-clip": 1}


@pytest.mark.parametrize("source", list(TIMM_ENCODERS))
@pytest.mark.parametrize("profile", ROUND_TRIPS)
def test_timm_variants_round_trip_and_match_timm(
    source: str,
    profile: str,
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
    rgb_images: list[np.ndarray],
) -> None:
    import timm
    import torch

    artifact = built(source, profile)
    assert open_artifact(artifact).manifest.model_info["num_prefix_tokens"] == TIMM_ENCODERS[source]
    model = timm.create_model(f"local-dir:{source_dir(source)}", pretrained=True).eval()
    with load(artifact) as pipeline:
        pixels = pipeline.preprocessor(load_images(rgb_images))
        got = pipeline.session.run({"pixel_values": pixels})
    x = torch.from_numpy(pixels)
    with torch.inference_mode():
        if model.num_classes:
            expected = {"logits": model(x).numpy()}  # DeiT distilled: its two heads averaged
        else:
            features = model.forward_features(x)
            pooled = model.forward_head(features, pre_logits=True)
            expected = {"last_hidden_state": features.numpy(), "pooler_output": pooled.numpy()}
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-4, rtol=0)
