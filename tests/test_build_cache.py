"""The build cache (kiln build --cache): one key per build's inputs, entries restored instead
of rebuilt, verified by content both ways, in a folder or any fsspec store; and `reuse`, which
keeps an up-to-date artifact (kiln bench --matrix) whatever its family."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelkiln import build, open_artifact
from modelkiln.build_cache import BuildCache, build_key, open_cache
from modelkiln.errors import StorageError
from modelkiln.plan import load_profile
from modelkiln.records import LoraRecord

pytestmark = pytest.mark.onnxruntime

PROFILE = "vit-onnxruntime-fp32"


def files_of(artifact: Path) -> dict[str, bytes]:
    return {
        p.relative_to(artifact).as_posix(): p.read_bytes()
        for p in artifact.rglob("*")
        if p.is_file()
    }


def test_the_key_changes_with_every_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelkiln.env

    profile = load_profile(PROFILE)
    weights = {"model.safetensors": "a" * 64}
    key = build_key(weights, profile)
    assert key == build_key(dict(weights), load_profile(PROFILE))  # deterministic
    assert len(key) == 32
    others = {
        "weights": build_key({"model.safetensors": "b" * 64}, profile),
        "profile": build_key(weights, load_profile(PROFILE, ["runtime.threads=1"])),
        "lora": build_key(weights, profile, [LoraRecord("/x.safetensors", "c" * 64, 0.8, "kohya")]),
        "lora scale": build_key(
            weights, profile, [LoraRecord("/x.safetensors", "c" * 64, 0.5, "kohya")]
        ),
    }
    data = tmp_path / "calibration"
    (data / "cat").mkdir(parents=True)
    (data / "cat" / "1.png").write_bytes(b"x")
    with_data = load_profile(PROFILE, [f'calibration.data="{data}"'])
    others["data"] = build_key(weights, with_data)
    (data / "cat" / "2.png").write_bytes(b"y")
    others["data content"] = build_key(weights, with_data)
    real = modelkiln.env.library_versions
    monkeypatch.setattr(modelkiln.env, "library_versions", lambda: {**real(), "onnx": "0.0.1"})
    others["versions"] = build_key(weights, profile)
    assert len({key, *others.values()}) == 1 + len(others), others
    # A LoRA is its content and scale: the same file elsewhere is the same build.
    moved = build_key(weights, profile, [LoraRecord("/y/x.safetensors", "c" * 64, 0.8, "kohya")])
    monkeypatch.setattr(modelkiln.env, "library_versions", real)
    assert (
        build_key(weights, profile, [LoraRecord("/z.safetensors", "c" * 64, 0.8, "kohya")])
        == (others["lora"])
    )
    assert moved != key


@pytest.mark.parametrize("location", ["folder", "memory"])
def test_a_cached_build_is_restored_verified_and_identical(
    location: str, source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    where = str(tmp_path / "cache") if location == "folder" else f"memory://kiln-{tmp_path.name}"
    source = source_dir("hf-classifier")
    first = BuildCache(where)
    built = build(source, PROFILE, tmp_path / "a", cache=first)
    key = open_artifact(built).manifest.build.key
    assert key is not None and first.stored == [key] and first.restored == []
    (entry,) = first.entries()
    assert (entry.key, entry.profile) == (key, PROFILE)
    second = BuildCache(where)
    restored = build(source, PROFILE, tmp_path / "b", cache=second)
    assert second.restored == [key] and second.stored == []
    assert files_of(restored) == files_of(built)
    # Another profile is another key: built, and stored beside.
    third = BuildCache(where)
    build(source, PROFILE, tmp_path / "c", overrides=["runtime.threads=1"], cache=third)
    assert third.restored == [] and len(third.stored) == 1
    assert len(BuildCache(where).entries()) == 2


def test_a_corrupted_entry_is_refused_and_rebuilt(
    source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    source, folder = source_dir("hf-classifier"), tmp_path / "cache"
    built = build(source, PROFILE, tmp_path / "a", cache=str(folder))
    key = open_artifact(built).manifest.build.key
    assert key is not None
    model = folder / key / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF
    model.unlink()  # a hard link to the artifact's file: break the link, not the artifact
    model.write_bytes(bytes(data))
    again = BuildCache(folder)
    rebuilt = build(source, PROFILE, tmp_path / "b", cache=again)
    assert again.restored == [] and again.stored == [key]  # refused, built, stored again
    assert files_of(rebuilt)["model.onnx"] == files_of(built)["model.onnx"]
    assert open_artifact(folder / key).manifest.build.key == key  # the entry is whole again


def test_reuse_keeps_an_up_to_date_sd_artifact(
    built: Callable[..., Path], source_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """What kiln bench --matrix does: an SD artifact (weights in component folders, none at
    the root) with the same key is kept, not rebuilt."""
    artifact = tmp_path / "sd"
    shutil.copytree(built("sd", "sd-onnxruntime-fp32"), artifact)
    stamp = (artifact / "kiln.json").stat().st_mtime_ns
    kept = build(source_dir("sd"), "sd-onnxruntime-fp32", artifact, reuse=True)
    assert kept == artifact and (artifact / "kiln.json").stat().st_mtime_ns == stamp
    # Another profile setting: rebuilt.
    build(source_dir("hf-classifier"), PROFILE, tmp_path / "vit", reuse=True)
    stamp = (tmp_path / "vit" / "kiln.json").stat().st_mtime_ns
    build(
        source_dir("hf-classifier"),
        PROFILE,
        tmp_path / "vit",
        overrides=["runtime.threads=1"],
        reuse=True,
    )
    assert (tmp_path / "vit" / "kiln.json").stat().st_mtime_ns != stamp


def test_the_cli_says_what_the_cache_did(
    source_dir: Callable[[str], Path], tmp_path: Path, kiln_main: Callable[..., Any]
) -> None:
    folder = tmp_path / "cache"
    args = ("build", source_dir("hf-classifier"), "-p", PROFILE, "--cache", folder)
    first = kiln_main(*args, "-o", tmp_path / "a")
    assert first.code == 0, first.err
    assert f"stored in the build cache {folder}" in first.out
    second = kiln_main(*args, "-o", tmp_path / "b")
    assert second.code == 0, second.err
    assert f"restored from the build cache {folder}" in second.out
    listed = kiln_main("cache", "list", "--cache", folder)
    assert listed.code == 0 and PROFILE in listed.out and "1 entries" in listed.out
    neither = kiln_main("cache", "prune", "--cache", folder)
    assert neither.code != 0 and "--older-than DAYS or --all" in neither.err
    kept = kiln_main("cache", "prune", "--older-than", "1", "--cache", folder)
    assert kept.code == 0 and "freed 0.0 MB" in kept.out
    pruned = kiln_main("cache", "prune", "--all", "--cache", folder)
    assert pruned.code == 0 and "removed" in pruned.out
    assert BuildCache(folder).entries() == []
    bad = kiln_main(*args, "-o", tmp_path / "c", "--cache", "nosuchproto://x")
    assert bad.code != 0 and "cannot open the build cache nosuchproto://x" in bad.err
    assert "Traceback" not in bad.err
    assert not (tmp_path / "c").exists()


def test_open_cache_defaults_under_modelkiln_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELKILN_CACHE", str(tmp_path))
    opened = open_cache("")
    assert opened is not None and Path(opened.location) == tmp_path / "builds"
    assert open_cache(None) is None
    with pytest.raises(StorageError, match="cannot open the build cache"):
        BuildCache("nosuchproto://x")
    assert opened.entries() == []


def test_a_cache_that_fails_costs_the_entry_not_the_build(
    source_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(self: BuildCache, key: str, artifact: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(BuildCache, "_store", full_disk)
    cache = BuildCache(tmp_path / "cache")
    built = build(source_dir("hf-classifier"), PROFILE, tmp_path / "a", cache=cache)
    assert open_artifact(built).manifest.build.key is not None
    assert cache.stored == [] and cache.entries() == []
