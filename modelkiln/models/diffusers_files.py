"""What the diffusers families read and copy from a pipeline folder: component configs and
weight files, the scheduler and tokenizer files an artifact carries ([generation]'s scheduler
written into its config), and a component's reference copy."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.diffusion.request import Defaults
from modelkiln.diffusion.schedulers import SCHEDULERS
from modelkiln.errors import SourceError, first_line
from modelkiln.pipelines.base import APPROXIMATIONS
from modelkiln.sources import find_weights

if TYPE_CHECKING:
    from modelkiln.profiles import Profile

# Root files the artifact copies so that it runs without the source: optimum's layout.
SHARED_DIRS = ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3")


def tokenizer_length(directory: Path) -> int:
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    length = config.get("model_max_length", 77)
    # Tokenizers without a limit store a huge sentinel; CLIP's position embeddings stop at 77.
    return int(length) if length and length < 100_000 else 77


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as error:
        raise SourceError(f"{path} is missing: the pipeline directory is incomplete") from error
    except json.JSONDecodeError as error:
        raise SourceError(f"{path} is not valid JSON ({error})") from error


def require_dir(root: Path, folder: str, spec: str, required: tuple[str, ...]) -> None:
    if not (root / folder).is_dir():
        needed = ", ".join(f"{name}/" for name in required)
        raise SourceError(
            f"{spec} has no {folder}/ folder: this diffusers pipeline directory needs {needed}"
        )


TAYLORSEER_SETTINGS = (
    "taylorseer_interval",
    "taylorseer_warmup",
    "taylorseer_cooldown",
    "taylorseer_order",
)


def generation_defaults(profile: Profile) -> dict[str, Any]:
    """[generation]'s steps and guidance, which the pipeline takes where a call leaves them,
    and its approximations (guidance_end, taylorseer_*, [model] deep_cache, first_block_cache
    and token_merging_ratio), which the torch reference never makes."""
    settings = profile.generation
    chosen = {
        key: value
        for key, value in (("steps", settings.steps), ("guidance", settings.guidance))
        if value is not None
    }
    info: dict[str, Any] = {"generation": chosen} if chosen else {}
    approximations: dict[str, Any] = {}
    if settings.guidance_end is not None:
        approximations["guidance_end"] = settings.guidance_end
    if settings.taylorseer_interval is not None and settings.taylorseer_interval > 1:
        # All of them, resolved: what an app reading the artifact must reproduce.
        for key in TAYLORSEER_SETTINGS:
            chosen = getattr(settings, key)
            approximations[key] = getattr(Defaults, key) if chosen is None else chosen
    if profile.model.deep_cache:
        approximations["deep_cache"] = profile.model.deep_cache
    if profile.model.first_block_cache:
        approximations["first_block_cache"] = profile.model.first_block_cache
    if profile.model.token_merging_ratio:
        approximations["token_merging_ratio"] = profile.model.token_merging_ratio
    if approximations:
        info[APPROXIMATIONS] = approximations
    return info


def with_scheduler(files: dict[str, bytes], profile: Profile) -> dict[str, bytes]:
    """[generation] scheduler written into scheduler_config.json as diffusers' from_config
    would configure it: its class, the name's overrides, the source's own values kept."""
    name = profile.generation.scheduler
    key = "scheduler/scheduler_config.json"
    if name is None or key not in files:
        return files
    scheduler_class, overrides = SCHEDULERS[name]
    config = json.loads(files[key])
    config.update({**overrides, "_class_name": scheduler_class.diffusers_class})
    return {**files, key: (json.dumps(config, indent=2) + "\n").encode()}


def shared_files(root: Path, index: Mapping[str, Any]) -> dict[str, bytes]:
    """model_index.json, scheduler and tokenizers: what running needs besides the models."""
    files: dict[str, bytes] = {}
    cleaned = dict(index)
    # Pieces we do not build would make optimum look for folders that are not there.
    for key in ("feature_extractor", "safety_checker", "image_encoder"):
        if key in cleaned:
            cleaned[key] = [None, None]
    files["model_index.json"] = (json.dumps(cleaned, indent=2) + "\n").encode()
    for folder in SHARED_DIRS:
        for path in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
            if path.is_file():
                files[f"{folder}/{path.name}"] = path.read_bytes()
        if f"{folder}/spiece.model" in files and f"{folder}/tokenizer.json" not in files:
            files[f"{folder}/tokenizer.json"] = _sentencepiece_tokenizer_json(root / folder)
        tokenizer_json = files.get(f"{folder}/tokenizer.json")
        if tokenizer_json is not None and f"{folder}/vocab.json" not in files:
            for name, content in _bpe_vocabulary_files(tokenizer_json).items():
                files[f"{folder}/{name}"] = content
    return files


def _sentencepiece_tokenizer_json(folder: Path) -> bytes:
    """tokenizer.json for a T5 tokenizer saved as spiece.model alone: the runtime's
    tokenizer (diffusion/tokenizer.py) reads only the former, and has no sentencepiece."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, ImportError) as error:
        raise SourceError(
            f"cannot read the tokenizer in {folder}: {first_line(error)} (a T5 tokenizer needs "
            "tokenizer.json, or spiece.model with the sentencepiece package installed)"
        ) from error
    return str(tokenizer.backend_tokenizer.to_str()).encode()


def _bpe_vocabulary_files(tokenizer_json: bytes) -> dict[str, bytes]:
    """vocab.json + merges.txt from a BPE tokenizer.json. transformers 5 saves only the
    latter; CLIPTokenizer in transformers 4 (which optimum pins) needs the former."""
    model = json.loads(tokenizer_json).get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model:
        return {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "vocab.json": json.dumps(model["vocab"], ensure_ascii=False).encode(),
        "merges.txt": "\n".join(["#version: 0.2", *merges, ""]).encode(),
    }


def save_reference(folder: Path, files: list[Path], pickle: bool, out: Path) -> None:
    """The diffusers layout: safetensors copied as they are; pickle weights converted."""
    out.mkdir(parents=True, exist_ok=True)
    if not pickle or all(f.suffix == ".safetensors" for f in files):
        shutil.copyfile(folder / "config.json", out / "config.json")
        for path in files:
            shutil.copyfile(path, out / path.name)
        return
    from modelkiln.models.stable_diffusion_modules import load_component

    load_component(folder, pickle=True).save_pretrained(out, safe_serialization=True)


def weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    """A component's weights, preferring the default files over variants (.fp16.safetensors)."""
    files = find_weights(folder, allow_pickle=allow_pickle)
    default = [f for f in files if len(f.name.split(".")) == 2]
    if default:
        return default
    raise SourceError(
        f"{folder} has only variant weights ({', '.join(f.name for f in files)}); modelkiln "
        "builds from the default fp32 files: fetch them (without a variant) and retry"
    )
