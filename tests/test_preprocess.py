"""modelkiln.preprocess against transformers' PIL image processors and timm's eval transform."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from modelkiln.errors import ArtifactError, InputError, SourceError, UnsupportedError
from modelkiln.preprocess import ImagePreprocessor

TOLERANCE = 1e-5
SIZES = [(37, 53), (300, 200), (224, 227), (20, 500)]  # (height, width)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + height * 1000 + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_image(height, width) for height, width in SIZES]


def _hf_processor(config: dict[str, Any]) -> Any:
    """transformers' PIL-backend ("slow") processor named by the config's image_processor_type."""
    transformers = pytest.importorskip("transformers")
    kind = config.get("image_processor_type", "ViTImageProcessor")
    pil_class = getattr(transformers, f"{kind}Pil", None)
    if pil_class is None:  # transformers 4.x: the plain class is the slow one.
        return getattr(transformers, kind)(**config, use_fast=False)
    return pil_class(**config)


def _hf_reference(processor: Any, image: Image.Image) -> np.ndarray:
    pixels = processor(image, return_tensors="np")["pixel_values"]
    return np.asarray(pixels, dtype=np.float32)


def _check(out: np.ndarray, reference: np.ndarray) -> None:
    assert out.shape == reference.shape
    assert out.dtype == np.float32
    assert out.flags.c_contiguous
    assert float(np.abs(out - reference).max()) <= TOLERANCE


# --- transformers ------------------------------------------------------------------------

HF_CONFIGS: dict[str, dict[str, Any]] = {
    "vit-defaults": {},
    "vit-bicubic-nonsquare": {"size": {"height": 64, "width": 48}, "resample": 3},
    "vit-int-size-lanczos": {"size": 96, "resample": 1, "image_mean": 0.45, "image_std": 0.2},
    "deit": {
        "image_processor_type": "DeiTImageProcessor",
        "size": {"height": 256, "width": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
    },
    "clip": {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 224},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    },
    "clip-legacy-ints": {
        "image_processor_type": "CLIPImageProcessor",
        "size": 64,
        "crop_size": 60,
        "do_center_crop": True,
        "resample": 2,
    },
    "no-resize-pads": {
        "do_resize": False,
        "do_center_crop": True,
        "crop_size": {"height": 64, "width": 61},
    },
    "no-normalize": {"size": {"height": 32, "width": 40}, "do_normalize": False},
    "no-rescale": {"size": {"height": 32, "width": 40}, "do_rescale": False, "resample": 0},
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_matches_transformers(name: str, images: list[Image.Image]) -> None:
    config = HF_CONFIGS[name]
    processor = _hf_processor(config)
    preprocessor = ImagePreprocessor.from_hf_config(config)
    for image in images:
        _check(preprocessor([image]), _hf_reference(processor, image))


def test_transformers_defaults() -> None:
    preprocessor = ImagePreprocessor.from_hf_config({})
    assert preprocessor.resize_mode == "exact"
    assert preprocessor.size == (224, 224)
    assert preprocessor.interpolation == "bilinear"
    assert preprocessor.crop_size is None
    assert preprocessor.rescale_factor == pytest.approx(1 / 255)
    assert preprocessor.mean == preprocessor.std == (0.5, 0.5, 0.5)
    assert preprocessor.output_size == (224, 224)
    sized = ImagePreprocessor.from_hf_config({"do_normalize": True}, default_image_size=(384, 320))
    assert sized.output_size == (384, 320)
    assert ImagePreprocessor.from_hf_config({"size": 32}).size == (32, 32)


def test_transformers_class_defaults(images: list[Image.Image]) -> None:
    for kind in ("CLIPImageProcessor", "DeiTImageProcessor"):
        config = {"image_processor_type": kind}
        processor = _hf_processor(config)
        preprocessor = ImagePreprocessor.from_hf_config({**config, "image_mean": None})
        assert preprocessor.output_size == (224, 224)
        _check(preprocessor(images[:2]), _hf_reference(processor, images[:2]))
    legacy = ImagePreprocessor.from_hf_config({"feature_extractor_type": "CLIPFeatureExtractor"})
    assert (legacy.resize_mode, legacy.size, legacy.interpolation) == (
        "shortest_edge",
        224,
        "bicubic",
    )


def test_disabled_steps_are_identities() -> None:
    preprocessor = ImagePreprocessor.from_hf_config(
        {"do_resize": False, "do_rescale": False, "do_normalize": False}
    )
    assert preprocessor.resize_mode == "none"
    assert preprocessor.size is None
    image = _image(5, 7)
    out = preprocessor([image])
    np.testing.assert_array_equal(out[0], np.asarray(image).transpose(2, 0, 1).astype(np.float32))


def test_crop_conventions_differ_on_odd_margins() -> None:
    # 227 - 224 = 3: torchvision rounds 1.5 to 2, transformers floors it to 1.
    image = _image(224, 227)
    hf = ImagePreprocessor.from_hf_config(HF_CONFIGS["clip"])
    tv = ImagePreprocessor(**{**hf.to_dict(), "crop_convention": "torchvision"})
    pixels = np.asarray(image).astype(np.float32).transpose(2, 0, 1)
    assert hf([image])[0, 0, 0, 0] == pytest.approx(
        (pixels[0, 0, 1] / 255 - CLIP_MEAN[0]) / CLIP_STD[0]
    )
    assert tv([image])[0, 0, 0, 0] == pytest.approx(
        (pixels[0, 0, 2] / 255 - CLIP_MEAN[0]) / CLIP_STD[0]
    )


def test_unsupported_transformers_configs() -> None:
    with pytest.raises(UnsupportedError, match="shortest_edge"):
        ImagePreprocessor.from_hf_config({"size": {"shortest_edge": 800, "longest_edge": 1333}})
    with pytest.raises(UnsupportedError, match="crop_pct"):
        ImagePreprocessor.from_hf_config({"size": {"shortest_edge": 224}, "crop_pct": 0.875})
    with pytest.raises(UnsupportedError, match="do_pad"):
        ImagePreprocessor.from_hf_config({"do_pad": True})


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"resample": 9}, "'resample' must be a PIL filter code"),
        ({"do_resize": "yes"}, "'do_resize' must be true or false"),
        ({"size": {"height": 0, "width": 4}}, "'size' must be a positive integer"),
        ({"image_mean": [0.5, 0.5]}, "'mean' must hold 3 values"),
        ({"image_std": [0.5, 0.0, 0.5]}, "'std' must be positive"),
        ({"do_center_crop": True}, "no 'crop_size'"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_malformed_transformers_configs(config: Any, pattern: str) -> None:
    with pytest.raises(SourceError, match=pattern):
        ImagePreprocessor.from_hf_config(config)


# --- to_hf_config ------------------------------------------------------------------------


HALF = (0.5, 0.5, 0.5)
TO_HF_CASES = {
    "vit": (
        ImagePreprocessor("exact", (40, 56), "bicubic", None, 1 / 255, (0.1, 0.2, 0.3), HALF),
        "ViTImageProcessor",
    ),
    "deit": (
        ImagePreprocessor("exact", (70, 70), "bilinear", (64, 60), 1 / 255, HALF, HALF),
        "DeiTImageProcessor",
    ),
    "clip": (
        ImagePreprocessor("shortest_edge", 72, "box", (64, 64), 0.5, HALF, HALF, "transformers"),
        "CLIPImageProcessor",
    ),
    "identity": (
        ImagePreprocessor("none", None, "bilinear", None, 1.0, (0.0,) * 3, (1.0,) * 3),
        "ViTImageProcessor",
    ),
}


@pytest.mark.parametrize("name", list(TO_HF_CASES))
def test_to_hf_config_reproduces_outputs(name: str, images: list[Image.Image]) -> None:
    preprocessor, kind = TO_HF_CASES[name]
    config = preprocessor.to_hf_config()
    assert config["image_processor_type"] == kind
    json.dumps(config)
    assert ImagePreprocessor.from_hf_config(config).to_dict() == {
        **preprocessor.to_dict(),
        "crop_convention": "transformers",
    }
    processor = _hf_processor(config)
    for image in images:
        _check(preprocessor([image]), _hf_reference(processor, image))


def test_to_hf_config_refuses_torchvision_crops(caplog: pytest.LogCaptureFixture) -> None:
    timm_like = ImagePreprocessor.from_timm_data_config(
        {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9}
    )
    with pytest.raises(UnsupportedError, match=r"torchvision.*strict=False"):
        timm_like.to_hf_config()
    with caplog.at_level(logging.WARNING, logger="modelkiln.preprocess"):
        config = timm_like.to_hf_config(strict=False)
    assert config["image_processor_type"] == "CLIPImageProcessor"
    assert config["size"] == {"shortest_edge": 248}
    assert "approximate" in caplog.text
    # A fixed resize whose margins are even crops identically in both conventions.
    squash = ImagePreprocessor.from_timm_data_config(
        {"input_size": (3, 224, 224), "crop_pct": 0.875, "crop_mode": "squash"}
    )
    assert squash.to_hf_config()["crop_size"] == {"height": 224, "width": 224}
    border = ImagePreprocessor.from_timm_data_config({"input_size": 224, "crop_mode": "border"})
    with pytest.raises(UnsupportedError, match="contain"):
        border.to_hf_config()


# --- timm --------------------------------------------------------------------------------


def _timm_check(data_config: dict[str, Any], images: list[Image.Image]) -> None:
    pytest.importorskip("torch")
    timm_data = pytest.importorskip("timm.data")
    transform = timm_data.create_transform(**data_config, is_training=False)
    preprocessor = ImagePreprocessor.from_timm_data_config(data_config)
    for image in images:
        _check(preprocessor([image]), transform(image).numpy()[None])


@pytest.mark.parametrize("crop_pct", [0.9, 1.0])
@pytest.mark.parametrize("crop_mode", ["center", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_matches_timm(
    crop_pct: float, crop_mode: str, interpolation: str, images: list[Image.Image]
) -> None:
    data_config = {
        "input_size": (3, 224, 224),
        "interpolation": interpolation,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
    }
    _timm_check(data_config, images)


@pytest.mark.parametrize(
    "extra",
    [
        {"crop_mode": "border", "crop_pct": 0.9},
        {"crop_mode": "border", "crop_pct": 1.0, "input_size": (3, 192, 256)},
        {"crop_mode": "center", "crop_pct": 0.95, "input_size": (3, 192, 256)},
        {"crop_mode": "center", "crop_pct": 1.3},
        {"crop_mode": "squash", "crop_pct": 1.15, "interpolation": "nearest"},
        {"crop_mode": None, "crop_pct": None, "interpolation": "lanczos"},
    ],
    ids=[
        "border",
        "border-nonsquare",
        "center-nonsquare",
        "center-pads",
        "squash-pads",
        "defaults",
    ],
)
def test_matches_timm_other_modes(extra: dict[str, Any], images: list[Image.Image]) -> None:
    data_config = {
        "input_size": (3, 160, 160),
        "interpolation": "bicubic",
        "mean": (0.5, 0.4, 0.3),
        "std": (0.2, 0.25, 0.3),
        **extra,
    }
    _timm_check(data_config, images)


@pytest.mark.parametrize("name", ["vit_base_patch16_224.augreg2_in21k_ft_in1k", "resnet50.a1_in1k"])
def test_timm_resolved_config_of_real_models(name: str, images: list[Image.Image]) -> None:
    timm = pytest.importorskip("timm")
    pretrained_cfg = timm.models.get_pretrained_cfg(name).to_dict()
    data_config = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg)
    preprocessor = ImagePreprocessor.from_timm_data_config(data_config)
    assert preprocessor.output_size == tuple(data_config["input_size"][1:])
    _timm_check(data_config, images)


def test_timm_center_crop_geometry() -> None:
    preprocessor = ImagePreprocessor.from_timm_data_config(
        {"input_size": (3, 224, 224), "crop_pct": 0.9, "interpolation": "bicubic"}
    )
    assert (preprocessor.resize_mode, preprocessor.size) == ("shortest_edge", 248)  # floor(224/.9)
    assert preprocessor.crop_size == (224, 224)
    assert preprocessor.mean == IMAGENET_MEAN
    border = ImagePreprocessor.from_timm_data_config(
        {"input_size": (3, 32, 32), "crop_mode": "border", "mean": (0.5, 0.2, 1.0)}
    )
    assert border.pad_value == (128, 51, 255)
    assert border.resize_mode == "contain"


@pytest.mark.parametrize(
    ("data_config", "error", "pattern"),
    [
        ({"crop_mode": "random"}, UnsupportedError, "crop_mode 'random'"),
        ({"input_size": (1, 224, 224)}, UnsupportedError, "1-channel"),
        ({"crop_border_pixels": 4}, UnsupportedError, "crop_border_pixels"),
        ({"interpolation": "random"}, SourceError, "'interpolation' must be one of"),
        ({"input_size": "big"}, SourceError, "'input_size' is malformed"),
        ({"crop_pct": -1}, SourceError, "'crop_pct' must be a positive number"),
        ({"mean": (0.5, 0.5)}, SourceError, "'mean' must hold 3 values"),
    ],
)
def test_bad_timm_configs(data_config: dict[str, Any], error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        ImagePreprocessor.from_timm_data_config(data_config)


# --- serialisation -----------------------------------------------------------------------


def test_dict_round_trip() -> None:
    original = ImagePreprocessor.from_timm_data_config(
        {"input_size": (3, 192, 256), "crop_mode": "border", "crop_pct": 0.9}
    )
    data = original.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert isinstance(data["size"], list)
    assert ImagePreprocessor.from_dict(json.loads(json.dumps(data))) == original
    shortest = ImagePreprocessor("shortest_edge", 64, "hamming", None, 0.5, (0,) * 3, (1,) * 3)
    assert ImagePreprocessor.from_dict(shortest.to_dict()) == shortest
    assert shortest.to_dict()["size"] == 64


def test_lists_are_stored_as_tuples() -> None:
    preprocessor = ImagePreprocessor("exact", [8, 9], "nearest", [4, 4], 1, [0, 0, 0], [1, 1, 1])  # type: ignore[arg-type]
    assert preprocessor.size == (8, 9)
    assert preprocessor.crop_size == (4, 4)
    assert preprocessor.mean == (0.0, 0.0, 0.0)
    assert isinstance(preprocessor.rescale_factor, float)
    hash(preprocessor)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"sizes": [1, 2]}, r"unknown key 'sizes' \(did you mean 'size'\?\)"),
        ({"interpolation": "bicubc"}, r"'interpolation' must be one of .*did you mean 'bicubic'"),
        ({"mean": [0.5, 0.5]}, "'mean' must hold 3 values"),
        ({"std": [1, 1, "x"]}, "'std' must be a finite number"),
        ({"size": [224]}, r"'size' must be \[height, width\]"),
        ({"resize_mode": "fill"}, "'resize_mode' must be one of"),
        ({"crop_size": [0, 3]}, "'crop_size' must be a positive integer"),
        ({"rescale_factor": None}, "'rescale_factor' must be a finite number"),
        ({"pad_value": [0, 0, 256]}, "'pad_value' values must be integers in 0..255"),
        ({"crop_convention": "numpy"}, "'crop_convention' must be one of"),
    ],
)
def test_from_dict_names_the_bad_key(change: dict[str, Any], pattern: str) -> None:
    data = {**ImagePreprocessor.from_hf_config({}).to_dict(), **change}
    with pytest.raises(ArtifactError, match=pattern):
        ImagePreprocessor.from_dict(data)


def test_from_dict_missing_key_and_wrong_type() -> None:
    data = ImagePreprocessor.from_hf_config({}).to_dict()
    del data["std"]
    with pytest.raises(ArtifactError, match="missing key 'std'"):
        ImagePreprocessor.from_dict(data)
    with pytest.raises(ArtifactError, match="must be a JSON object"):
        ImagePreprocessor.from_dict([("size", 1)])  # type: ignore[arg-type]


def test_direct_construction_validates() -> None:
    with pytest.raises(InputError, match="'size' must be null when resize_mode is 'none'"):
        ImagePreprocessor("none", 224, "bilinear", None, 1.0, (0,) * 3, (1,) * 3)


# --- running -----------------------------------------------------------------------------


def test_call_accepts_paths_modes_and_single_images(tmp_path: Path) -> None:
    preprocessor = ImagePreprocessor("exact", (8, 8), "bilinear", None, 1 / 255, (0,) * 3, (1,) * 3)
    gray = Image.new("L", (5, 3), 255)
    path = tmp_path / "gray.png"
    gray.save(path)
    batch = preprocessor([gray, path, np.full((3, 5), 255, np.uint8)])
    assert batch.shape == (3, 3, 8, 8)
    np.testing.assert_allclose(batch, 1.0, atol=1e-6)
    assert preprocessor(gray).shape == (1, 3, 8, 8)
    assert preprocessor(str(path)).shape == (1, 3, 8, 8)
    assert preprocessor(np.zeros((2, 4, 4, 3), np.uint8)).shape == (2, 3, 8, 8)
    assert gray.mode == "L"


def test_call_errors() -> None:
    preprocessor = ImagePreprocessor("shortest_edge", 8, "bilinear", None, 1.0, (0,) * 3, (1,) * 3)
    with pytest.raises(InputError, match="different sizes"):
        preprocessor([_image(8, 8), _image(8, 16)])
    with pytest.raises(InputError, match="no images"):
        preprocessor([])
    with pytest.raises(InputError, match="dtype int64"):
        preprocessor([np.zeros((4, 4), np.int64)])
    assert preprocessor([_image(8, 8), _image(16, 16)]).shape == (2, 3, 8, 8)
    contain = ImagePreprocessor("contain", (8, 8), "bilinear", None, 1.0, (0,) * 3, (1,) * 3)
    with pytest.raises(InputError, match="too thin"):
        contain([_image(1, 100)])


def test_output_size() -> None:
    crop = ImagePreprocessor("shortest_edge", 9, "bilinear", (8, 6), 1.0, (0,) * 3, (1,) * 3)
    assert crop.output_size == (8, 6)
    assert crop.has_fixed_output_size
    assert crop([_image(30, 20), _image(12, 50)]).shape == (2, 3, 8, 6)
    variable = ImagePreprocessor("shortest_edge", 9, "bilinear", None, 1.0, (0,) * 3, (1,) * 3)
    assert not variable.has_fixed_output_size
    with pytest.raises(UnsupportedError, match="no fixed output size"):
        _ = variable.output_size


def test_center_crop_pads_like_torchvision() -> None:
    # 3×3 image into a 6×6 crop: torchvision pads 1 before and 2 after each axis.
    preprocessor = ImagePreprocessor("none", None, "bilinear", (6, 6), 1.0, (0,) * 3, (1,) * 3)
    image = Image.new("RGB", (3, 3), (9, 9, 9))
    out = preprocessor([image])[0, 0]
    expected = np.zeros((6, 6), np.float32)
    expected[1:4, 1:4] = 9
    np.testing.assert_array_equal(out, expected)
    floor = ImagePreprocessor(**{**preprocessor.to_dict(), "crop_convention": "transformers"})
    expected = np.zeros((6, 6), np.float32)
    expected[2:5, 2:5] = 9  # transformers pads ceil(3 / 2) = 2 before.
    np.testing.assert_array_equal(floor([image])[0, 0], expected)


def test_modules_import_and_run_without_torch() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'transformers', 'timm'):\n"
        "    sys.modules[name] = None\n"
        "import numpy as np\n"
        "from modelkiln.images import load_image\n"
        "from modelkiln.preprocess import ImagePreprocessor\n"
        "p = ImagePreprocessor.from_timm_data_config({'input_size': (3, 32, 32)})\n"
        "image = load_image(np.zeros((40, 50, 3), np.uint8))\n"
        "assert p([image]).shape == (1, 3, 32, 32)\n"
        "assert ImagePreprocessor.from_hf_config({}).to_hf_config()\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
