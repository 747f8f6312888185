"""LoRAs fused at build ([[lora]], --lora): every layout diffusers reads fuses to
W + scale * B @ A, and the built artifact generates what diffusers' fused pipeline does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from diffusion_checks import diffusers_reference, generate, psnr

from modelkiln import build, load
from modelkiln.artifact import sha256_file
from modelkiln.checkpoints.lora import fuse_loras
from modelkiln.errors import ProfileError, SourceError, UnsupportedError
from modelkiln.loading import open_artifact
from modelkiln.plan import load_profile
from modelkiln.profiles import LoraSettings, read_profile
from modelkiln.sources import resolve_source
from modelkiln.testing.lora import lora_layers, write_lora

SCALE = 0.8


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused pipelines are cached under $MODELKILN_CACHE: each test starts without one."""
    monkeypatch.setenv("MODELKILN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def layers(source_dir: Callable[[str], Path]) -> dict[str, dict[str, Any]]:
    return lora_layers(source_dir("sd"))


def expected_weights(base: dict[str, Any], layers: dict[str, Any], scale: float) -> dict[str, Any]:
    """W + scale * B @ A for every layer the LoRA adapts."""
    expected = {}
    for key, down in layers.items():
        if ".lora_A." in key:
            module = key.removesuffix(".lora_A.weight")
            up = layers[f"{module}.lora_B.weight"]
            expected[f"{module}.weight"] = base[f"{module}.weight"] + scale * up @ down
    return expected


@pytest.mark.parametrize(
    ("layout", "alpha", "text_encoder"),
    [("diffusers", None, True), ("kohya", 2.0, True), ("peft", 8.0, False)],
)
def test_every_layout_fuses_to_w_plus_scaled_b_a(
    layout: str,
    alpha: float | None,
    text_encoder: bool,
    layers: dict[str, dict[str, Any]],
    source_dir: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    import torch
    from safetensors.torch import load_file

    source = source_dir("sd")
    name = "lora" if layout == "peft" else "lora.safetensors"
    lora = write_lora(layers, tmp_path / name, layout=layout, alpha=alpha)
    fused = fuse_loras(resolve_source(source), [LoraSettings(str(lora), SCALE)])
    (record,) = fused.loras
    assert (record.layout, record.scale) == (layout, SCALE)

    for component, file in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        base = load_file(str(source / component / file))
        weights = load_file(str(fused.local_dir / component / file))
        assert weights.keys() == base.keys()
        adapted = component == "unet" or text_encoder
        expected = expected_weights(base, layers[component], SCALE) if adapted else {}
        assert len(expected) == ((32 if component == "unet" else 8) if adapted else 0)
        for key, tensor in weights.items():
            want = expected.get(key, base[key])
            assert torch.allclose(tensor, want, atol=1e-6, rtol=0), f"{component}/{key}"
            if key not in expected:
                assert torch.equal(tensor, base[key]), f"{component}/{key} changed"


def test_a_build_with_loras_generates_what_diffusers_fused_pipeline_does(
    layers: dict[str, dict[str, Any]],
    source_dir: Callable[[str], Path],
    tmp_path: Path,
    kiln_main: Callable[..., Any],
) -> None:
    source = source_dir("sd")
    first = write_lora(layers, tmp_path / "style.safetensors")
    second = write_lora(lora_layers(source, seed=1), tmp_path / "kohya.safetensors", layout="kohya")
    profile = tmp_path / "with-lora.toml"
    profile.write_text(
        load_profile("sd-onnxruntime-fp32").to_toml()
        + '\n[[lora]]\npath = "style.safetensors"\nscale = 0.8\n',
        encoding="utf-8",
    )
    artifact = tmp_path / "art"
    outcome = kiln_main("build", source, "-p", profile, "-o", artifact, "--lora", f"{second}:0.5")
    assert outcome.code == 0, outcome.err

    manifest = open_artifact(artifact).manifest
    assert [(Path(r.path), r.scale, r.layout) for r in manifest.source.loras] == [
        (first, 0.8, "diffusers"),
        (second, 0.5, "kohya"),
    ]
    assert [r.sha256 for r in manifest.source.loras] == [sha256_file(first), sha256_file(second)]
    assert [(Path(lora.path), lora.scale) for lora in manifest.profile.lora] == [
        (first, 0.8),
        (second, 0.5),
    ]
    info = kiln_main("info", artifact)
    assert f"{first} × 0.8 (diffusers)" in info.out
    assert f"{second} × 0.5 (kohya)" in info.out
    # The gate's reference was the fused model: the build's end-to-end check passed on it.
    ours = generate(load(artifact), "text")
    expected = diffusers_reference(source, "text", loras=((first, 0.8), (second, 0.5)))
    plain = diffusers_reference(source, "text")
    assert psnr(ours, expected) >= 40
    assert psnr(ours, plain) < psnr(ours, expected) - 10  # the LoRAs changed the image

    # The same LoRAs again: the fused pipeline is reused, not fused again.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("fused.json")}
    assert len(stamps) == 1
    fuse_loras(
        resolve_source(source),
        [LoraSettings(str(first), 0.8), LoraSettings(str(second), 0.5)],
    )
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("fused.json")} == stamps


def test_lora_mistakes_are_clear(
    layers: dict[str, dict[str, Any]],
    source_dir: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    sd = resolve_source(source_dir("sd"))
    with pytest.raises(SourceError, match=r"no LoRA file at .*missing\.safetensors"):
        fuse_loras(sd, [LoraSettings(str(tmp_path / "missing.safetensors"))])
    pickled = tmp_path / "lora.pt"
    pickled.write_bytes(b"x")
    with pytest.raises(SourceError, match="pickle LoRAs are not read"):
        fuse_loras(sd, [LoraSettings(str(pickled))])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SourceError, match="is not a valid safetensors file"):
        fuse_loras(sd, [LoraSettings(str(corrupt))])
    # An SD LoRA on SDXL's wider attention does not fit its layers.
    sd_lora = write_lora(layers, tmp_path / "sd-lora.safetensors")
    with pytest.raises(SourceError, match="does not load into this StableDiffusionXLPipeline"):
        fuse_loras(resolve_source(source_dir("sdxl")), [LoraSettings(str(sd_lora))])
    # Layers this UNet does not have (peft finds none of its target modules).
    foreign = write_lora(
        {"unet": {k.replace(".to_", ".tox_"): v for k, v in layers["unet"].items()}},
        tmp_path / "foreign.safetensors",
    )
    with pytest.raises(
        SourceError,
        match=r"does not load into this StableDiffusionPipeline .*"
        r"not found in the base model.*is it a LoRA for this architecture\?",
    ):
        fuse_loras(sd, [LoraSettings(str(foreign))])
    with pytest.raises(UnsupportedError, match=r"\[\[lora\]\] does not apply to vit models"):
        load_profile("vit-onnxruntime-fp32", ['lora=[{path="x.safetensors"}]'])
    with pytest.raises(ProfileError, match=r"lora\[0\]\.path is empty"):
        read_profile("sd-onnxruntime-fp32", ['lora=[{path=" "}]'])
    with pytest.raises(UnsupportedError, match="is not a diffusers pipeline"):
        fuse_loras(resolve_source(source_dir("hf-classifier")), [LoraSettings(str(sd_lora))])
    assert not (tmp_path / "cache" / "lora-fused").exists() or not any(
        (tmp_path / "cache" / "lora-fused").iterdir()
    )
    with pytest.raises(SourceError, match="no LoRA file"):
        build(
            source_dir("sd"),
            "sd-onnxruntime-fp32",
            tmp_path / "art",
            loras=[LoraSettings(str(tmp_path / "nowhere.safetensors"))],
        )
    assert not (tmp_path / "art").exists()
