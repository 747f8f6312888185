"""Single-file checkpoints (the original LDM / SGM layout): `kiln convert` both ways, pinned to
diffusers' own single-file loader, and builds from a single file equal to builds from the
folder it came from."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from modelkiln import build
from modelkiln.artifact import sha256_file
from modelkiln.checkpoints.convert import convert_checkpoint
from modelkiln.checkpoints.single_file import cached_folder, inspect_file
from modelkiln.errors import SourceError, UnsupportedError
from modelkiln.loading import open_artifact

# source -> the prefixes its single file keeps its components under (as A1111 / SGM do).
LAYOUTS = {
    "sd": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."),
    "sd-inpaint": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."),
    "sd2": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."),
    "sdxl-wide": (
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.",
        "conditioner.embedders.1.model.",
    ),
    "sdxl-inpaint-wide": (
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.",
        "conditioner.embedders.1.model.",
    ),
    "sd3": (
        "model.diffusion_model.",
        "first_stage_model.",
        "text_encoders.clip_l.transformer.",
        "text_encoders.clip_g.transformer.",
        "text_encoders.t5xxl.transformer.",
    ),
}


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Conversions are cached under $MODELKILN_CACHE: each test starts without one."""
    monkeypatch.setenv("MODELKILN_CACHE", str(tmp_path / "cache"))


def tensors(folder: Path) -> dict[str, dict[str, object]]:
    """component -> its tensors, from every safetensors file under the folder."""
    from safetensors.torch import load_file

    found: dict[str, dict[str, object]] = {}
    for file in sorted(folder.glob("*/*.safetensors")):
        found.setdefault(file.parent.name, {}).update(load_file(str(file)))
    return found


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_folder_written_as_a_single_file_loads_back_bit_identically(
    name: str, source_dir: Callable[[str], Path], tmp_path: Path, kiln_main: Callable[..., object]
) -> None:
    import torch
    from safetensors import safe_open

    folder = source_dir(name)
    if name == "sd3":
        folder = with_identity_clip_l_projection(folder, tmp_path / "sd3")
    single = tmp_path / "model.safetensors"
    assert kiln_main("convert", folder, single).code == 0  # type: ignore[attr-defined]
    with safe_open(str(single), framework="pt") as written:
        keys = list(written.keys())
    assert all(key.startswith(LAYOUTS[name]) for key in keys)
    assert {prefix for prefix in LAYOUTS[name] if any(k.startswith(prefix) for k in keys)} == set(
        LAYOUTS[name]
    )
    # Tiny widths: diffusers' detection falls back to v1 (--config names the pipeline).
    expected_type = "inpainting" if "inpaint" in name else "v1"
    assert inspect_file(single).model_type == expected_type

    back = tmp_path / "back"
    # Read back by diffusers' from_single_file, with the folder's configs and tokenizers.
    assert kiln_main("convert", single, back, "--config", folder).code == 0  # type: ignore[attr-defined]
    original, loaded = tensors(folder), tensors(back)
    assert original.keys() == loaded.keys()
    for component, weights in original.items():
        assert weights.keys() == loaded[component].keys(), component
        for key, tensor in weights.items():
            assert torch.equal(tensor, loaded[component][key]), f"{component}/{key}"  # type: ignore[arg-type]


def with_identity_clip_l_projection(source: Path, copy: Path) -> Path:
    """The tiny SD3 with CLIP-L's projection the identity, as SD3's is: its single file has
    no place for another."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, copy)
    file = copy / "text_encoder" / "model.safetensors"
    weights = load_file(str(file))
    weights["text_projection.weight"] = torch.eye(*weights["text_projection.weight"].shape)
    save_file(weights, str(file), metadata={"format": "pt"})
    return copy


def test_a_build_from_a_single_file_equals_the_build_from_its_folder(
    source_dir: Callable[[str], Path], built: Callable[..., Path], tmp_path: Path
) -> None:
    folder = source_dir("sd")
    single = convert_checkpoint(folder, tmp_path / "sd.safetensors")
    artifact = build(single, "sd-onnxruntime-fp32", tmp_path / "art", config=folder)

    from_file = open_artifact(artifact).manifest
    from_folder = open_artifact(built("sd", "sd-onnxruntime-fp32")).manifest
    assert from_file.files == from_folder.files  # every exported file: same sha256
    record = from_file.source.single_file
    assert record is not None
    assert record.sha256 == sha256_file(single)
    assert (record.pipeline, record.dtype, record.config) == (
        "StableDiffusionPipeline",
        "float32",
        str(folder.resolve()),
    )


def test_an_fp16_file_converts_without_an_fp32_copy_and_once(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    folder = source_dir("sd")
    single = convert_checkpoint(folder, tmp_path / "sd.safetensors")
    half = tmp_path / "sd-fp16.safetensors"
    save_file({k: v.half() for k, v in load_file(str(single)).items()}, str(half))
    assert inspect_file(half).dtype == "float16"

    converted, record = cached_folder(half, config=folder)
    assert record.dtype == "float16"
    weights = tensors(converted)
    assert {t.dtype for c in weights.values() for t in c.values()} == {torch.float16}  # type: ignore[attr-defined]
    originals = tensors(folder)["unet"]
    for key, tensor in weights["unet"].items():
        assert torch.equal(tensor, originals[key].half())  # type: ignore[attr-defined]
    # The second ask finds the conversion: the same folder, not written again.
    stamp = (converted / "single_file.json").stat().st_mtime_ns
    moved = half.rename(tmp_path / "moved.safetensors")
    again, record = cached_folder(moved, config=folder)
    assert again == converted and (converted / "single_file.json").stat().st_mtime_ns == stamp
    assert record.path == str(moved.resolve())
    # Other configs (an edited --config folder): converted again.
    import shutil

    edited = Path(shutil.copytree(folder, tmp_path / "configs"))
    scheduler = edited / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert cached_folder(moved, config=edited)[0] != converted


def test_single_file_mistakes_are_one_line_errors(
    source_dir: Callable[[str], Path],
    tmp_path: Path,
    kiln_main: Callable[..., object],
) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    folder = source_dir("sd")
    single = convert_checkpoint(folder, tmp_path / "sd.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    foreign = tmp_path / "vit.safetensors"
    save_file({"vit.embeddings.cls_token": np.zeros((1, 1, 8), np.float32)}, str(foreign))
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not read")

    cases = [
        (["build", corrupt, "-p", "sd-onnxruntime-fp32"], "is not a valid safetensors file"),
        (["build", foreign, "-p", "sd-onnxruntime-fp32"], "holds no diffusion model weights"),
        (["build", pickled, "-p", "sd-onnxruntime-fp32"], "pass --allow-pickle if you trust it"),
        # Offline, without --config: the configs cannot be fetched.
        (["build", single, "-p", "sd-onnxruntime-fp32"], "pass --config DIR"),
        (
            ["build", single, "-p", "sd-onnxruntime-fp32", "--config", tmp_path],
            "expected a diffusers pipeline folder with model_index.json",
        ),
        (
            ["build", source_dir("sdxl"), "-p", "sdxl-onnxruntime-fp32", "--config", folder],
            "--config is for single-file checkpoints",
        ),
        (["convert", folder, single], "exists; conversion never overwrites"),
        (["convert", folder, tmp_path / "out.ckpt"], "name it *.safetensors"),
        (["convert", source_dir("hf-classifier"), tmp_path / "x.safetensors"], "no model_index"),
    ]
    for args, message in cases:
        outcome = kiln_main(*args)
        assert outcome.code != 0, args  # type: ignore[attr-defined]
        *steps, line = outcome.err_lines  # type: ignore[attr-defined]
        # One error line, after at most the progress lines of the steps it ended (✗).
        assert message in line and all(step.startswith("✗ ") for step in steps), (args, steps)
    assert not (tmp_path / "x.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cache",
        "corrupt.safetensors",
        "model.ckpt",
        "sd.safetensors",
        "vit.safetensors",
    ]


def test_what_a_single_file_cannot_hold_is_refused_by_the_writer(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    with pytest.raises(UnsupportedError, match="writing a single file is supported for"):
        convert_checkpoint(source_dir("flux-schnell"), tmp_path / "flux.safetensors")
    with pytest.raises(UnsupportedError, match="text_projection is not the identity"):
        convert_checkpoint(source_dir("sd3"), tmp_path / "sd3.safetensors")
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"] or not any(tmp_path.iterdir())


def test_a_converted_folder_is_what_diffusers_saves(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    folder = source_dir("sdxl-wide")
    single = convert_checkpoint(folder, tmp_path / "xl.safetensors")
    back = convert_checkpoint(single, tmp_path / "xl", config=folder)
    index = json.loads((back / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    with pytest.raises(SourceError, match="exists; conversion never overwrites"):
        convert_checkpoint(single, back, config=folder)
