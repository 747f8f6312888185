"""Real data for calibration and the end-to-end quality gate: image folders, the digits set,
PSNR/SSIM, recorded calibration feeds and a gate that fails the build with its numbers."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modelkiln import build, open_artifact
from modelkiln.datasets import image_set
from modelkiln.errors import ProfileError, UnsupportedError, ValidationError
from modelkiln.image_quality import psnr, ssim
from modelkiln.plan import load_plan, load_profile
from modelkiln.progress import NullProgress


def _gradient(size: int = 32) -> np.ndarray:
    ramp = np.linspace(0, 255, size)
    return np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8)


def test_psnr_and_ssim_of_known_images() -> None:
    image = _gradient()
    assert psnr(image, image) == float("inf")
    assert ssim(image, image) == pytest.approx(1.0)
    image = image // 2
    shifted = image + 4
    # A constant offset of 4: MSE 16, PSNR 10 log10(255² / 16) = 36.09 dB.
    assert psnr(image, shifted) == pytest.approx(36.0896, abs=1e-3)
    assert 0.98 < ssim(image, shifted) < 1.0
    noise = np.random.default_rng(0).integers(0, 256, image.shape, dtype=np.uint8)
    assert ssim(image, noise) < 0.1
    assert psnr(Image.fromarray(image), Image.fromarray(noise)) < 10
    with pytest.raises(ValueError, match="differ in size"):
        psnr(image, image[:16])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(image[:8, :8], image[:8, :8])


def _write(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_image_folder_layouts_and_their_errors(tmp_path: Path) -> None:
    for index, label in enumerate(["cat", "cat", "dog"]):
        _write(tmp_path / "labelled" / label / f"{index}.png", index)
    labelled = image_set(str(tmp_path / "labelled"), "validation.data", "test")
    assert labelled.class_names == ["cat", "cat", "dog"]
    assert labelled.label_indices(["dog", "cat"], "validation.data").tolist() == [1, 1, 0]
    with pytest.raises(ProfileError, match="class folder 'cat' is neither one of the model's"):
        labelled.label_indices(["bird"], "validation.data")
    assert len(labelled.subset(2, seed=0)) == 2

    for index in range(2):
        _write(tmp_path / "flat" / f"{index}.jpg", index)
    flat = image_set(str(tmp_path / "flat"), "calibration.data", "train")
    assert flat.class_names is None and len(flat) == 2
    with pytest.raises(ProfileError, match="flat folder of images, without labels"):
        flat.label_indices(["a"], "validation.data")

    _write(tmp_path / "mixed" / "a.png", 0)
    _write(tmp_path / "mixed" / "b" / "c.png", 1)
    with pytest.raises(ProfileError, match="mixes images at several depths"):
        image_set(str(tmp_path / "mixed"), "calibration.data", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileError, match="holds no images"):
        image_set(str(tmp_path / "empty"), "calibration.data", "train")
    with pytest.raises(ProfileError, match="is not a directory"):
        image_set(str(tmp_path / "missing"), "calibration.data", "train")


def test_digits_splits_calibrate_on_train_and_validate_on_test() -> None:
    train = image_set("digits", "calibration.data", "train")
    test = image_set("digits", "validation.data", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert test.class_names is not None and set(test.class_names) == {str(d) for d in range(10)}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["validation.max_accuracy_drop=1.0"], "max_accuracy_drop needs labelled images"),
        (["validation.min_psnr_db=30.0"], "min_psnr_db needs validation.prompts"),
        (['validation.prompts=["a cat"]'], "validation.prompts does not apply to vit models"),
        (["calibration.size=0"], r"calibration\.size must be in 1\.\.100000, got 0"),
        (
            ["components.vision_model.scheme=int8-hybrid"],
            r"\[components.vision_model\]: format 'onnx' has no quantization scheme 'int8-hybrid'",
        ),
    ],
)
def test_real_data_settings_are_checked_with_the_profile(
    overrides: list[str], message: str
) -> None:
    with pytest.raises((ProfileError, UnsupportedError), match=message):
        load_profile("vit-onnxruntime-int8", overrides)


def test_a_calibrated_scheme_without_data_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"needs calibration images: .*calibration.data="):
        build(
            tmp_path / "not-even-read",
            "vit-openvino-int8",
            tmp_path / "out",
            overrides=["quantization.scheme=int8-static"],
        )
    sd = load_plan("sd-openvino-fp32", ["components.unet.scheme=int8-hybrid"])
    with pytest.raises(ProfileError, match="needs calibration prompts"):
        sd.require_calibration_data()


@pytest.mark.torch
@pytest.mark.openvino
def test_end_to_end_gate_records_accuracy_and_fails_with_the_numbers(
    built: Callable[..., Path], source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    artifact = built(
        "hf-classifier",
        "vit-openvino-int8",
        'validation.data="digits"',
        "validation.max_accuracy_drop=3.0",
    )
    record = open_artifact(artifact).manifest.end_to_end
    assert record is not None and record.images == 360 and record.data == "digits"
    assert record.accuracy_drop is not None and abs(record.accuracy_drop) <= 3.0
    logits = record.outputs["logits"]
    assert logits.top1_agreement is not None and logits.top1_agreement >= 0.9
    assert logits.sqnr_db is not None and 20 < logits.sqnr_db < 80

    out = tmp_path / "artifact"
    shutil.copytree(artifact, out)
    before = (out / "kiln.json").read_bytes()
    with pytest.raises(
        ValidationError,
        match=r"end-to-end quality on 360 images of digits .*SQNR \d+\.\d dB < 120\.0 dB",
    ):
        build(
            source_dir("hf-classifier"),
            "vit-openvino-int8",
            out,
            overrides=[
                'validation.data="digits"',
                "validation.min_sqnr_db=120.0",
                # the component gate passes: the miss is the end-to-end one
                "components.vision_model.min_sqnr_db=10.0",
            ],
        )
    assert (out / "kiln.json").read_bytes() == before  # the earlier artifact survives


@pytest.mark.torch
def test_diffusion_calibration_records_every_component_input(
    source_dir: Callable[[str], Path],
) -> None:
    from modelkiln.models import detect_family
    from modelkiln.reference import pipeline_class
    from modelkiln.sources import resolve_source

    profile = load_profile(
        "sd-openvino-fp32",
        [
            'calibration.prompts=["a red cube", "a blue sphere"]',
            "calibration.size=3",
            "calibration.steps=2",
        ],
    )
    resolved = resolve_source(source_dir("sd"))
    loaded = detect_family(resolved).load(resolved, profile)
    names = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    feeds = pipeline_class(loaded).calibration_feeds(loaded, profile, names, NullProgress())
    # One per denoising step (the test scheduler, PNDM, adds a warm-up step to each run).
    assert len(feeds["unet"]) == 3 * 3
    assert feeds["unet"][0]["sample"].shape == (2, 4, 16, 16)  # CFG doubles the batch
    assert len(feeds["text_encoder"]) >= 3
    assert [f["sample"].shape for f in feeds["vae_encoder"]] == [(1, 3, 32, 32)] * 3
    assert (
        -1.0
        <= feeds["vae_encoder"][0]["sample"].min()
        < feeds["vae_encoder"][0]["sample"].max()
        <= 1.0
    )
    assert len(feeds["vae_decoder"]) == 3
    # Different prompts condition the UNet differently.
    first, second = (
        feeds["unet"][0]["encoder_hidden_states"],
        feeds["unet"][3]["encoder_hidden_states"],
    )
    assert not np.allclose(first, second)
