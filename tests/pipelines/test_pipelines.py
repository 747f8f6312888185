"""Classification and embedding pipelines: same answers whatever the input form or batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modelkiln import ImageClassificationPipeline, ImageEmbeddingPipeline, load
from modelkiln.errors import InputError, ProfileError
from modelkiln.images import load_images
from modelkiln.pipelines.classification import Prediction, softmax

pytestmark = [pytest.mark.torch, pytest.mark.onnxruntime]


@pytest.fixture(scope="module")
def classifier(built: Callable[..., Path]) -> ImageClassificationPipeline:
    return load(built("hf-classifier", "vit-onnxruntime-fp32"))


@pytest.fixture(scope="module")
def embedder(built: Callable[..., Path]) -> ImageEmbeddingPipeline:
    return load(built("hf-backbone", "vit-onnxruntime-fp32", "model.hidden_layers=[1, 2]"))


def test_single_image_gives_a_list_and_a_list_gives_lists(
    classifier: ImageClassificationPipeline, rgb_images: list[np.ndarray]
) -> None:
    single = classifier(rgb_images[0], top_k=2)
    assert isinstance(single, list) and all(isinstance(p, Prediction) for p in single)
    batch = classifier(rgb_images, top_k=2)
    assert len(batch) == 3 and batch[0] == single


def test_scores_are_the_softmax_of_the_logits_and_sorted(
    classifier: ImageClassificationPipeline, rgb_images: list[np.ndarray]
) -> None:
    logits = classifier.logits(rgb_images)
    probabilities = softmax(logits)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    for row, predictions in zip(probabilities, classifier(rgb_images, top_k=10), strict=True):
        assert [p.index for p in predictions] == list(np.argsort(-row, kind="stable"))
        assert [p.label for p in predictions] == [f"class_{p.index}" for p in predictions]
        np.testing.assert_allclose([p.score for p in predictions], np.sort(row)[::-1], rtol=1e-6)


def test_top_k_is_clipped_to_the_label_count_and_validated(
    classifier: ImageClassificationPipeline, rgb_images: list[np.ndarray]
) -> None:
    assert len(classifier(rgb_images[0], top_k=50)) == 10
    with pytest.raises(InputError, match="top_k must be >= 1, got 0"):
        classifier(rgb_images[0], top_k=0)
    with pytest.raises(InputError, match="no images given"):
        classifier([])
    with pytest.raises(InputError, match="batch size must be >= 1, got 0"):
        classifier(rgb_images, batch_size=0)


def test_paths_pil_images_and_arrays_agree_at_any_batch_size(
    classifier: ImageClassificationPipeline, rgb_images: list[np.ndarray], image_files: list[Path]
) -> None:
    from_arrays = classifier.logits(rgb_images, batch_size=8)
    from_paths = classifier.logits(image_files, batch_size=1)
    from_pil = classifier.logits([Image.fromarray(a) for a in rgb_images], batch_size=2)
    np.testing.assert_allclose(from_paths, from_arrays, atol=1e-6)
    np.testing.assert_allclose(from_pil, from_arrays, atol=1e-6)


def test_grayscale_rgba_and_16_bit_files_classify_like_their_rgb_equivalents(
    classifier: ImageClassificationPipeline, tmp_path: Path
) -> None:
    gray = np.random.default_rng(3).integers(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 128)])).save(tmp_path / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    expected = classifier.logits([np.dstack([gray] * 3)])
    for name in ("gray.png", "rgba.png", "gray16.png"):
        np.testing.assert_allclose(classifier.logits([tmp_path / name]), expected, atol=1e-6)


def test_embedding_poolings_match_the_raw_outputs(
    embedder: ImageEmbeddingPipeline, rgb_images: list[np.ndarray]
) -> None:
    outputs = embedder.session.run({"pixel_values": embedder.preprocessor(load_images(rgb_images))})
    tokens = outputs["last_hidden_state"]
    cases = {
        "cls": tokens[:, 0],
        "mean": tokens[:, 1:].mean(axis=1),
        "pooled": outputs["pooler_output"],
        "auto": outputs["pooler_output"],  # a ViTModel has a pooler
    }
    for pooling, expected in cases.items():
        raw = embedder(rgb_images, pooling=pooling, normalize=False)  # type: ignore[arg-type]
        np.testing.assert_allclose(raw, expected, atol=1e-6)
        unit = embedder(rgb_images, pooling=pooling)  # type: ignore[arg-type]
        np.testing.assert_allclose(
            unit, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6
        )
    layer_mean = embedder(rgb_images, layer=2, pooling="mean", normalize=False)
    np.testing.assert_allclose(layer_mean, outputs["hidden_state_2"][:, 1:].mean(axis=1), atol=1e-6)


def test_embedding_errors_say_what_to_do(
    embedder: ImageEmbeddingPipeline, built: Callable[..., Path], rgb_images: list[np.ndarray]
) -> None:
    with pytest.raises(
        InputError, match="pooling 'max' is unknown; use one of: auto, cls, mean, pooled"
    ):
        embedder(rgb_images, pooling="max")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="with a layer use cls or mean"):
        embedder(rgb_images, layer=1, pooling="pooled")
    with pytest.raises(
        InputError,
        # The model has two blocks: no rebuild could export a third.
        match=r"no hidden state for layer 3 \(exported: 1, 2\); layers are block numbers 1..2$",
    ):
        embedder(rgb_images, layer=3)
    no_pooler = load(
        built("hf-classifier", "vit-onnxruntime-fp32", "model.task=image-feature-extraction")
    )
    with pytest.raises(
        InputError, match="this model has no pooler output; use pooling 'cls' or 'mean'"
    ):
        no_pooler(rgb_images, pooling="pooled")


def test_session_validates_feeds(classifier: ImageClassificationPipeline) -> None:
    session = classifier.session
    good = np.zeros((2, 3, 32, 32), np.float32)
    assert session.run({"pixel_values": good})["logits"].shape == (2, 10)
    with pytest.raises(
        InputError,
        match=r"missing input\(s\) 'pixel_values' and unexpected input\(s\) 'pixels'; this model takes: pixel_values",
    ):
        session.run({"pixels": good})
    with pytest.raises(
        InputError,
        match=r"has dtype float64, expected float32 \(convert with \.astype\(np\.float32\)\)",
    ):
        session.run({"pixel_values": good.astype(np.float64)})
    with pytest.raises(
        InputError,
        match=r"has shape \(2, 3, 16, 16\), expected \(batch, 3, 32, 32\) \(axis 2 must be 32\)",
    ):
        session.run({"pixel_values": np.zeros((2, 3, 16, 16), np.float32)})
    with pytest.raises(InputError, match=r"expected rank 4"):
        session.run({"pixel_values": np.zeros((3, 32, 32), np.float32)})
    with pytest.raises(InputError, match=r"has no output\(s\) 'probs'; it has: logits"):
        session.run({"pixel_values": good}, ["probs"])


@pytest.mark.openvino
def test_load_overrides_reach_the_runtime(built: Callable[..., Path]) -> None:
    artifact = built("hf-classifier", "vit-openvino-fp32")
    with load(artifact, threads=1, performance_hint="throughput") as pipeline:
        info = pipeline.session.info
    assert info["threads"] == 1
    assert info["performance_hint"] == "throughput"
    assert info["inference_precision"] == "f32"
    with load(artifact, compute_precision="bf16") as pipeline:
        assert pipeline.session.info["inference_precision"] in ("bf16", "f32")
    # The runtime's own settings are checked like its profile section, and named when unknown.
    with pytest.raises(ProfileError, match=r"openvino\.performance_hint = 'fast' is not one of"):
        load(artifact, performance_hint="fast")
    with pytest.raises(TypeError, match=r"unknown runtime option\(s\): graph_optimization; known:"):
        load(artifact, graph_optimization="all")


@pytest.mark.openvino
def test_openvino_static_shapes_compile_each_shape_called_and_keep_the_last_two(
    built: Callable[..., Path],
) -> None:
    artifact = built("hf-classifier", "vit-openvino-fp32")
    rng = np.random.default_rng(0)
    pixels = {n: rng.standard_normal((n, 3, 32, 32)).astype(np.float32) for n in (1, 2, 3)}
    with load(artifact) as dynamic, load(artifact, static_shapes=True) as static:
        assert static.session.info["static_shapes"] == []
        for batch in (2, 1, 2, 3):
            expected = dynamic.session.run({"pixel_values": pixels[batch]})["logits"]
            got = static.session.run({"pixel_values": pixels[batch]})["logits"]
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        kept = static.session.info["static_shapes"]
        assert "static_shapes" not in dynamic.session.info
    # Batch 1 was the least recently used of three: dropped.
    assert kept == [{"pixel_values": (2, 3, 32, 32)}, {"pixel_values": (3, 3, 32, 32)}]
