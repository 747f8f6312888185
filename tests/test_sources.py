"""Source resolution, family detection and the one-line errors of a build that cannot start.

Every source here is local or refused offline (conftest sets HF_HUB_OFFLINE=1): hub ids must
fail with "cannot fetch", never download.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from modelkiln import build, load, open_artifact
from modelkiln.artifact import sha256_file
from modelkiln.errors import KilnError, SourceError, UnsupportedError
from modelkiln.models import detect_family
from modelkiln.models.vit import ViTFamily
from modelkiln.records import SourceRecord
from modelkiln.sources import find_weights, resolve_source

# The fastest profile: the torch "export" is a safetensors copy, validated by torch itself.
FAST_PROFILE = "vit-torch-fp32"


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def copy_source(source_dir: Callable[[str], Path], name: str, target: Path) -> Path:
    """A private copy of a shared tiny source, safe to edit."""
    return Path(shutil.copytree(source_dir(name), target))


def to_pickle(directory: Path) -> Path:
    """Replace model.safetensors with the same tensors in a torch.save pickle."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(directory / "model.safetensors"))
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    return directory


def assert_build_fails(
    source: str | Path,
    tmp_path: Path,
    error: type[Exception],
    match: str,
    **kwargs: object,
) -> KilnError:
    """build() raises `error` matching `match`, and leaves nothing behind in tmp_path."""
    before = set(tmp_path.iterdir())
    out = tmp_path / "out"
    with pytest.raises(error, match=match) as caught:
        build(source, FAST_PROFILE, out, **kwargs)  # type: ignore[arg-type]
    assert not out.exists(), "a failed build must not leave an output directory"
    assert set(tmp_path.iterdir()) == before, "no staging directory left behind"
    assert isinstance(caught.value, KilnError)
    assert "\n" not in str(caught.value), "user-facing errors are one line"
    return caught.value


# --- resolve_source -------------------------------------------------------------------------


def test_local_dir_resolves_to_itself(
    source_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = source_dir("hf-classifier")
    monkeypatch.chdir(directory.parent)
    resolved = resolve_source(directory.name)  # relative: resolved to an absolute path
    assert resolved.local_dir == directory.resolve()
    assert resolved.local_dir.is_absolute()
    assert resolved.spec == directory.name, "the spec is kept exactly as the user typed it"
    assert resolved.hub_id is None
    assert resolved.revision is None
    assert resolved.allow_pickle is False
    assert resolved.describe() == SourceRecord(directory.name, None, None, str(directory.resolve()))
    assert resolve_source(directory, allow_pickle=True).allow_pickle is True


def test_a_vision_models_weights_file_is_refused_as_a_single_file(
    source_dir: Callable[[str], Path],
) -> None:
    weights = source_dir("hf-classifier") / "model.safetensors"
    with pytest.raises(
        UnsupportedError,
        match=r"model\.safetensors holds no diffusion model weights in the original layout .*"
        r"for a transformers or timm model pass its directory \(config\.json \+ "
        r"model\.safetensors\)",
    ):
        resolve_source(weights)


@pytest.mark.parametrize("spec", ["no_such_model_dir", "./missing", "a/b/c"])
def test_unknown_name_is_neither_dir_nor_hub_id(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        SourceError,
        match=rf"^'{spec}' is not a local directory, a Hugging Face Hub id \(org/name\), "
        r"timm:NAME or hf-hub:org/name$",
    ):
        resolve_source(spec)


@pytest.mark.parametrize(
    ("spec", "hub_id"),
    [
        ("google/vit-base-patch16-224", "google/vit-base-patch16-224"),
        (
            "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
            "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        ),
        # timm's default tag for the architecture is on the hub under timm/<name>.<tag>
        ("timm:vit_tiny_patch16_224", "timm/vit_tiny_patch16_224."),
    ],
)
def test_hub_sources_cannot_be_fetched_offline(spec: str, hub_id: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=rf"^cannot fetch '{re.escape(hub_id)}") as caught:
        resolve_source(spec)
    message = str(caught.value)
    assert "from the Hugging Face Hub (" in message
    assert message.endswith("check the id and your network, or pass a local directory")
    assert "\n" not in message
    # The same error ends the build before any output exists.
    assert_build_fails(spec, tmp_path, SourceError, rf"^cannot fetch '{re.escape(hub_id)}")


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("not_a_model_xyz", ""),
        ("vit_tiny_patch16_22", " (did you mean 'vit_tiny_patch16_224"),
        ("vit_tiny_patch16_224.no_such_tag", ""),
    ],
)
def test_unknown_timm_name_is_a_source_error(name: str, suggestion: str) -> None:
    pytest.importorskip("timm")
    with pytest.raises(SourceError, match=rf"^timm has no pretrained model '{name}'") as caught:
        resolve_source(f"timm:{name}")
    assert suggestion in str(caught.value)


# --- find_weights ---------------------------------------------------------------------------


def test_find_weights_prefers_safetensors(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    for name in ("model.safetensors", "b.safetensors"):
        save_file({"w": np.zeros(2, dtype=np.float32)}, str(tmp_path / name))
    found = find_weights(tmp_path, allow_pickle=True)
    assert [p.name for p in found] == ["b.safetensors", "model.safetensors"]
    assert [p.name for p in find_weights(tmp_path, allow_pickle=False)] == [
        "b.safetensors",
        "model.safetensors",
    ]


def test_find_weights_refuses_pickle_unless_allowed(tmp_path: Path) -> None:
    for name in ("pytorch_model.bin", "weights.pth"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(
        SourceError,
        match=r"has only pickle weights \(pytorch_model\.bin, weights\.pth\); pickle can run "
        r"arbitrary code when loaded: convert them to safetensors or pass --allow-pickle",
    ):
        find_weights(tmp_path, allow_pickle=False)
    found = find_weights(tmp_path, allow_pickle=True)
    assert [p.name for p in found] == ["pytorch_model.bin", "weights.pth"]


def test_find_weights_in_an_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        SourceError,
        match=rf"^no weights in {re.escape(str(tmp_path))}: expected model\.safetensors$",
    ):
        find_weights(tmp_path, allow_pickle=True)


# --- detect_family --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hf-classifier", "hf-backbone", "timm-classifier"])
def test_detects_vit(name: str, source_dir: Callable[[str], Path]) -> None:
    assert detect_family(resolve_source(source_dir(name))) is ViTFamily


@pytest.mark.parametrize(
    ("files", "found"),
    [
        pytest.param(
            {"config.json": {"model_type": "bert", "architectures": ["BertModel"]}},
            r"found a transformers model_type 'bert' \(BertModel\)",
            id="bert",
        ),
        pytest.param(
            {"config.json": {"model_type": "bert"}},
            r"found a transformers model_type 'bert' \(no architectures\)",
            id="bert-no-architectures",
        ),
        pytest.param({}, "found no config.json", id="empty"),
        pytest.param(
            {
                "model_index.json": {"_class_name": "KandinskyPipeline"},
                "unet/config.json": {"_class_name": "UNet2DConditionModel"},
            },
            r"found a diffusers pipeline \(KandinskyPipeline\)",
            id="diffusers",
        ),
        pytest.param(
            {"config.json": {"architecture": "resnet18"}},
            "found a timm architecture 'resnet18'",
            id="timm-without-pretrained-cfg",
        ),
        pytest.param(
            {"config.json": {"hidden_size": 32}},
            "found a config.json with neither model_type nor architecture",
            id="bare-config",
        ),
    ],
)
def test_unsupported_source_names_what_it_found(
    files: dict[str, object], found: str, tmp_path: Path
) -> None:
    source = tmp_path / "model"
    source.mkdir()
    for name, content in files.items():
        write_json(source / name, content)
    with pytest.raises(
        UnsupportedError,
        match=rf"^{re.escape(str(source))}: {found}, which modelkiln does not support; supported: vit: "
        r"transformers ViT, DeiT, DINOv2 \(with registers\), CLIP and SigLIP vision encoders .*timm VisionTransformer.*; "
        r"sd: diffusers StableDiffusionPipeline .*; sdxl: diffusers StableDiffusionXLPipeline",
    ):
        detect_family(resolve_source(source))
    # build() stops at the same point, before any output exists.
    assert_build_fails(source, tmp_path, UnsupportedError, found)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", r"config\.json is not valid JSON \("),
        ("[1, 2]", r"config\.json must hold a JSON object, not list$"),
    ],
)
def test_malformed_config_is_a_source_error(content: str, match: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(SourceError, match=match):
        detect_family(resolve_source(tmp_path))


# --- build() error paths --------------------------------------------------------------------


def test_unsupported_transformers_architecture(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    source = copy_source(source_dir, "hf-classifier", tmp_path / "mim")
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["ViTForMaskedImageModeling"]
    write_json(source / "config.json", config)
    assert_build_fails(
        source,
        tmp_path,
        UnsupportedError,
        r"^transformers architecture 'ViTForMaskedImageModeling' is not supported; "
        r"supported: ViTForImageClassification, ViTModel, DeiTForImageClassification, .*"
        r"CLIPVisionModelWithProjection, SiglipVisionModel, CLIPModel, SiglipModel$",
    )


def test_timm_model_that_is_not_a_vit(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    source = tmp_path / "resnet"
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    timm.models.save_for_hf(model, str(source), safe_serialization=True)
    assert json.loads((source / "config.json").read_text())["architecture"] == "resnet18"
    assert_build_fails(
        source,
        tmp_path,
        UnsupportedError,
        rf"^timm model 'ResNet' in {re.escape(str(source))} is not a vision transformer; supported: timm "
        r"VisionTransformer models",
    )


def test_config_without_weights(source_dir: Callable[[str], Path], tmp_path: Path) -> None:
    source = tmp_path / "no-weights"
    source.mkdir()
    shutil.copy(source_dir("hf-classifier") / "config.json", source)
    assert_build_fails(
        source,
        tmp_path,
        SourceError,
        rf"^no weights in {re.escape(str(source))}: expected model\.safetensors$",
    )


def test_nonexistent_source_fails_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert_build_fails("nowhere", tmp_path, SourceError, "is not a local directory")


def test_single_file_fails_the_build(source_dir: Callable[[str], Path], tmp_path: Path) -> None:
    assert_build_fails(
        source_dir("hf-classifier") / "model.safetensors",
        tmp_path,
        UnsupportedError,
        "holds no diffusion model weights",
    )


@pytest.fixture(scope="module")
def pickle_source(
    tmp_path_factory: pytest.TempPathFactory, source_dir: Callable[[str], Path]
) -> Path:
    target = tmp_path_factory.mktemp("pickle") / "hf-classifier-pickle"
    return to_pickle(copy_source(source_dir, "hf-classifier", target))


def test_pickle_weights_are_refused_by_default(pickle_source: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in pickle_source.iterdir() if "model" in p.name) == [
        "pytorch_model.bin"
    ]
    assert_build_fails(
        pickle_source,
        tmp_path,
        SourceError,
        r"has only pickle weights \(pytorch_model\.bin\); .*--allow-pickle if you trust the source",
    )


def test_pickle_weights_build_with_allow_pickle(
    pickle_source: Path,
    tmp_path: Path,
    built: Callable[..., Path],
    rgb_images: list[np.ndarray],
) -> None:
    """transformers 5 still loads a pytorch_model.bin when the user opts in."""
    artifact = build(pickle_source, FAST_PROFILE, tmp_path / "out", allow_pickle=True)
    manifest = open_artifact(artifact, verify=True).manifest
    assert manifest.source.weights_sha256 == {
        "pytorch_model.bin": sha256_file(pickle_source / "pytorch_model.bin")
    }
    assert manifest.source.local_dir == str(pickle_source)
    assert manifest.components["vision_model"].validation.passed is True
    # The pickle really was loaded: same logits as the artifact built from the safetensors
    # (a silently random-initialised model would differ).
    with load(artifact) as from_pickle, load(built("hf-classifier", FAST_PROFILE)) as from_safe:
        np.testing.assert_allclose(
            from_pickle.logits(rgb_images), from_safe.logits(rgb_images), atol=1e-6
        )
    # The artifact itself stores safetensors only.
    assert not list(artifact.rglob("*.bin"))
