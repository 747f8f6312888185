"""LoRAs chosen at run time ([runtime_lora]): one artifact, its UNet exported unfused with
LoRA slots, generates what diffusers' pipeline with each LoRA fused generates, at any scale
and for several LoRAs at once, without a rebuild; ONNX Runtime runs the matrices as a LoRA
adapter, and an adapter file written once runs without torch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_support import kiln_json
from diffusion_checks import diffusers_reference, generate, psnr
from PIL import Image

from modelkiln import load, open_artifact
from modelkiln.diffusion.lora import LoraMatrices, slot_feeds
from modelkiln.errors import BackendUnavailableError, InputError, ProfileError, UnsupportedError
from modelkiln.plan import load_profile
from modelkiln.testing.lora import lora_layers, write_lora

pytestmark = pytest.mark.onnxruntime

PROFILE = "sd-onnxruntime-lora"


@pytest.fixture(scope="module")
def loras(source_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two UNet LoRAs of the tiny SD: a kohya file (alpha 2, rank 4) and a diffusers one."""
    folder = tmp_path_factory.mktemp("loras")
    source = source_dir("sd")
    kohya = write_lora(
        lora_layers(source, text_encoder=False),
        folder / "kohya.safetensors",
        layout="kohya",
        alpha=2.0,
    )
    style = write_lora(
        lora_layers(source, seed=1, text_encoder=False), folder / "style.safetensors"
    )
    return kohya, style


def test_slot_feeds_stack_loras_into_one_of_their_summed_rank() -> None:
    rng = np.random.default_rng(0)
    first = LoraMatrices("a", {"x": (rng.normal(size=(2, 5)), rng.normal(size=(3, 2)))})
    second = LoraMatrices(
        "b",
        {
            "x": (rng.normal(size=(4, 5)), rng.normal(size=(3, 4))),
            "y": (rng.normal(size=(4, 6)), rng.normal(size=(2, 4))),
        },
    )
    feeds = slot_feeds({"x": (5, 3), "y": (6, 2)}, [(first, 0.5), (second, -2.0)])
    a1, b1 = first.layers["x"]
    a2, b2 = second.layers["x"]
    assert feeds["x.lora_A"].shape == (6, 5) and feeds["x.lora_B"].shape == (3, 6)
    np.testing.assert_allclose(
        feeds["x.lora_B"] @ feeds["x.lora_A"], 0.5 * b1 @ a1 - 2.0 * b2 @ a2, atol=1e-5
    )
    a3, b3 = second.layers["y"]  # a layer only the second LoRA adapts
    np.testing.assert_allclose(feeds["y.lora_B"] @ feeds["y.lora_A"], -2.0 * b3 @ a3, atol=1e-5)
    assert slot_feeds({"x": (5, 3)}, []) == {}
    with pytest.raises(UnsupportedError, match=r"adapts 1 layer\(s\) .* no run-time slot .*\(y\)"):
        slot_feeds({"x": (5, 3)}, [(second, 1.0)])
    with pytest.raises(UnsupportedError, match="layer x is 5 -> 3 in the LoRA but 5 -> 4"):
        slot_feeds({"x": (5, 4)}, [(first, 1.0)])


def test_one_build_runs_any_lora_at_any_scale_like_diffusers_fused_pipeline(
    loras: tuple[Path, Path],
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
    tmp_path: Path,
    kiln_main: Callable[..., Any],
) -> None:
    source = source_dir("sd")
    kohya, style = loras
    artifact = built("sd", PROFILE)
    unet = open_artifact(artifact).manifest.components["unet"]
    slots = [name for name, spec in unet.inputs.items() if spec.optional]
    assert len(slots) == 2 * 32  # A and B of each attention projection of the tiny UNet
    assert unet.validation.passed  # checked against torch with random matrices in the slots

    pipeline = load(artifact)
    base = generate(pipeline, "text")
    assert psnr(base, diffusers_reference(source, "text")) >= 40  # no LoRA: the plain UNet
    # Two scales of one LoRA; the diffusers-layout one is read by the same loader, in the pair.
    for lora, scale in ((kohya, 0.5), (kohya, 1.0)):
        pipeline.set_loras([(lora, scale)])
        ours = generate(pipeline, "text")
        expected = diffusers_reference(source, "text", loras=((lora, scale),))
        assert psnr(ours, expected) >= 40, (lora.name, scale)
        assert psnr(ours, base) < psnr(ours, expected) - 10  # the LoRA changed the image
    both = ((kohya, 0.5), (style, 0.8))
    pipeline.set_loras(list(both))
    assert psnr(generate(pipeline, "text"), diffusers_reference(source, "text", loras=both)) >= 40
    pipeline.set_loras([])
    assert np.array_equal(np.asarray(generate(pipeline, "text")), np.asarray(base))
    pipeline.close()

    # The CLI: --lora on generate, and an adapter file that runs without torch.
    adapter = tmp_path / "both.onnx_adapter"
    written = kiln_json(
        "lora-adapter", "lora-adapter", artifact, f"{kohya}:0.5", f"{style}:0.8", "-o", adapter
    )
    assert written["files"] == [str(adapter)] and adapter.is_file()
    assert written["loras"] == [
        {"path": str(kohya), "scale": 0.5},
        {"path": str(style), "scale": 0.8},
    ]
    from_files = tmp_path / "files.png"
    from_adapter = tmp_path / "adapter.png"
    common = ("--prompt", "a red door", "--steps", "2")
    args = ("--lora", f"{kohya}:0.5", "--lora", f"{style}:0.8", "-o", from_files)
    assert kiln_main("generate", artifact, *common, *args).code == 0
    assert kiln_main("generate", artifact, *common, "--lora", adapter, "-o", from_adapter).code == 0
    files, adapted = (np.asarray(Image.open(p), np.float64) for p in (from_files, from_adapter))
    assert psnr(files, adapted) >= 60


def test_the_adapter_is_what_feeding_the_matrices_computes(
    loras: tuple[Path, Path], built: Callable[..., Path]
) -> None:
    from modelkiln.checkpoints.lora_slots import lora_matrices
    from modelkiln.diffusion.lora import slot_layers

    artifact = built("sd", PROFILE)
    with load(artifact) as pipeline:
        unet = pipeline.sessions["unet"]
        config = pipeline._unet_config
        arrays = slot_feeds(slot_layers(unet.input_specs), [(lora_matrices(loras[0], config), 1)])
        feeds = {
            name: spec.random({"batch": 2, "lora_rank": 1}, np.random.default_rng(0))
            for name, spec in unet.input_specs.items()
            if not spec.optional
        }
        plain = unet.run(feeds)["out_sample"]
        fed = unet.run({**feeds, **arrays})["out_sample"]
        unet.bind(arrays)
        bound = unet.run(feeds)["out_sample"]
        assert unet._adapter is not None  # ONNX Runtime's LoraAdapter supplied them
        np.testing.assert_allclose(bound, fed, atol=1e-6)
        assert np.abs(fed - plain).max() > 1e-3
        unet.bind({})
        np.testing.assert_array_equal(unet.run(feeds)["out_sample"], plain)


def test_runtime_lora_mistakes_are_clear(
    loras: tuple[Path, Path],
    built: Callable[..., Path],
    source_dir: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    from modelkiln.checkpoints.lora_slots import write_artifact_adapter
    from modelkiln.profiles import LoraSettings

    for overrides, error, message in (
        (
            ["export.format=openvino", "runtime.name=openvino"],
            UnsupportedError,
            "built for the onnx format run by ONNX",
        ),
        (["quantization.scheme=int8-dynamic"], UnsupportedError, "fp32 without a quantization"),
        (["precision.weights=fp16", "precision.compute=fp16"], UnsupportedError, "in fp32"),
        (["runtime_lora.targets=[]"], ProfileError, "runtime_lora.targets is empty"),
    ):
        with pytest.raises(error, match=message):
            load_profile(PROFILE, overrides)
    with pytest.raises(UnsupportedError, match=r"\[runtime_lora\] does not apply to sd3"):
        load_profile("sd3-onnxruntime-fp32", ["runtime_lora.enabled=true"])

    artifact = built("sd", PROFILE)
    source = source_dir("sd")
    with load(artifact) as pipeline:
        # Layers outside the slots (the feed-forward output), and a text encoder part.
        feed_forward = lora_layers(source, text_encoder=False, unet_targets=["to_q", "ff.net.2"])
        foreign = write_lora(feed_forward, tmp_path / "ff.safetensors")
        with pytest.raises(UnsupportedError, match=r"no run-time slot for .*ff\.net\.2"):
            pipeline.set_loras([(foreign, 1.0)])
        with_text = write_lora(lora_layers(source), tmp_path / "te.safetensors")
        with pytest.raises(UnsupportedError, match=r"also adapts text_encoder; .* fuse this LoRA"):
            pipeline.set_loras([(with_text, 1.0)])
        with pytest.raises(InputError, match=r"name the adapter file x\.onnx_adapter"):
            write_artifact_adapter(artifact, [LoraSettings(str(loras[0]))], tmp_path / "x.bin")
    with (
        load(built("sd", "sd-onnxruntime-fp32")) as plain,
        pytest.raises(
            UnsupportedError, match=r"has no run-time LoRA slots .*; fuse LoRAs at build"
        ),
    ):
        plain.set_loras([(loras[0], 1.0)])


def test_a_device_without_torch_is_told_to_use_an_adapter_file(
    loras: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from modelkiln.checkpoints.lora_slots import read_lora

    monkeypatch.setitem(sys.modules, "diffusers", None)  # unimportable, as on a device
    with pytest.raises(BackendUnavailableError, match=r"needs torch and diffusers .* lora-adapter"):
        read_lora(loras[0], {})
