"""LoRAs fused into a diffusers pipeline before export ([[lora]], `kiln build --lora`).

diffusers' own loaders do the work: `load_lora_weights` reads the diffusers, kohya/A1111 and
other layouts it knows, `fuse_lora(lora_scale)` adds scale * B @ A to each base weight and
`unload_lora_weights` drops the adapters, the fused weights staying. A peft adapter folder
(adapter_config.json + adapter_model.safetensors, saved from the UNet or transformer) is
given to it as a diffusers state dict, its alpha / r scaling folded into B. The fused pipeline
is saved once per (source, LoRAs, scales) under $MODELKILN_CACHE/lora-fused, in the dtype the
source stores, and every family loads it as it loads any folder: the export, the memory plan
and the gate's torch reference all see the fused model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.checkpoints.header import read_header
from modelkiln.checkpoints.single_file import stored_dtype
from modelkiln.errors import SourceError, UnsupportedError, first_line
from modelkiln.records import LoraRecord

if TYPE_CHECKING:
    from modelkiln.profiles import LoraSettings
    from modelkiln.sources import ResolvedSource

logger = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# A pipeline in memory holds its weights plus loading's transient copies.
LOAD_OVERHEAD = 1.2


def fuse_loras(
    resolved: ResolvedSource, loras: Sequence[LoraSettings], *, max_memory_gb: float | None = None
) -> ResolvedSource:
    """`resolved` with `loras` fused in: the cached fused folder, recorded in the source."""
    from modelkiln.env import cache_home
    from modelkiln.outputs import atomic_directory

    if not (resolved.local_dir / "model_index.json").is_file():
        raise UnsupportedError(
            f"{resolved.spec} is not a diffusers pipeline; LoRAs are fused into SD, SDXL, SD3 "
            "and Flux pipelines"
        )
    denoiser = "unet" if (resolved.local_dir / "unet").is_dir() else "transformer"
    records = tuple(lora_record(lora) for lora in loras)
    key = _cache_key(resolved, records)
    target = cache_home() / "lora-fused" / key
    fused = replace(resolved, local_dir=target, loras=records)
    if (target / "model_index.json").is_file() and (target / "fused.json").is_file():
        return fused
    _require_memory(resolved.local_dir, max_memory_gb)
    logger.info("fusing %d LoRA(s) into %s in %s", len(records), resolved.spec, target)
    with atomic_directory(target, marker=None) as staging:
        _fuse_into(resolved.local_dir, list(zip(loras, records, strict=True)), denoiser, staging)
        (staging / "fused.json").write_text(
            json.dumps([asdict(r) for r in records]), encoding="utf-8"
        )
    return fused


def layout_of(keys: Sequence[str]) -> str:
    """How a LoRA file names its weights (diffusers converts each to its own)."""
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "transformer.", "text_encoder")) for k in keys):
        return "diffusers"
    return "other"


def lora_record(lora: LoraSettings) -> LoraRecord:
    from modelkiln.artifact import sha256_file

    path = Path(lora.path).expanduser()
    layout = lora_layout(path)
    weights = path / PEFT_WEIGHTS if layout == "peft" else path
    return LoraRecord(str(path.resolve()), sha256_file(weights), lora.scale, layout)


def lora_layout(path: Path) -> str:
    """The layout of the LoRA at `path` ("peft" for an adapter folder), checked to be one
    diffusers reads: a one-line error otherwise."""
    if path.is_dir():
        if not (path / PEFT_CONFIG).is_file() or not (path / PEFT_WEIGHTS).is_file():
            raise SourceError(
                f"LoRA {path} is a folder without {PEFT_CONFIG} and {PEFT_WEIGHTS}; pass a "
                "LoRA .safetensors file or a peft adapter folder"
            )
        return "peft"
    if not path.is_file():
        raise SourceError(f"no LoRA file at {path}; check the [[lora]] path or --lora")
    if path.suffix.lower() != ".safetensors":
        raise SourceError(
            f"LoRA {path} is not a .safetensors file; pickle LoRAs are not read: convert it"
        )
    return layout_of(list(read_header(path, what="LoRA ", fix="download it again")))


def _cache_key(resolved: ResolvedSource, records: Sequence[LoraRecord]) -> str:
    """What the fused weights depend on: the source's folder and files as they are (path,
    size, mtime) and each LoRA's hash and scale, in order."""
    from modelkiln.integrity import stat_digest

    root = resolved.local_dir
    loras = [f"{r.sha256}:{r.scale!r}" for r in records]
    return stat_digest(root, root.glob("*/*.safetensors"), str(root.resolve()), *loras)[:20]


def _require_memory(folder: Path, max_memory_gb: float | None) -> None:
    from modelkiln.memory_budget import GB, limit_bytes, limit_source

    stored = sum(f.stat().st_size for f in folder.glob("*/*.safetensors"))
    needed, limit = stored * LOAD_OVERHEAD, limit_bytes(max_memory_gb)
    if needed > limit:
        raise UnsupportedError(
            f"fusing LoRAs loads the whole pipeline ({stored / GB:.1f} GB of weights, about "
            f"{needed / GB:.1f} GB in memory) and the build may use {limit / GB:.1f} GB "
            f"({limit_source(max_memory_gb)}); fuse on a larger machine and build the fused "
            "folder"
        )


def _fuse_into(
    folder: Path,
    loras: Sequence[tuple[LoraSettings, LoraRecord]],
    denoiser: str,
    destination: Path,
) -> None:
    import torch
    from diffusers import DiffusionPipeline

    from modelkiln.quiet import quiet_libraries

    dtype = getattr(torch, stored_dtype(sorted((folder / denoiser).glob("*.safetensors"))))
    with quiet_libraries():
        pipeline = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype)
        _fuse_each(pipeline, loras, denoiser)
        pipeline.save_pretrained(str(destination), safe_serialization=True)


def _fuse_each(
    pipeline: Any, loras: Sequence[tuple[LoraSettings, LoraRecord]], denoiser: str
) -> None:
    for index, (lora, record) in enumerate(loras):
        name = f"kiln_lora_{index}"
        weights = peft_state_dict(Path(record.path), denoiser) if record.layout == "peft" else None
        try:
            pipeline.load_lora_weights(weights or record.path, adapter_name=name)
        except Exception as error:  # diffusers raises many types for a foreign LoRA
            raise SourceError(
                f"LoRA {record.path} does not load into this {type(pipeline).__name__} "
                f"({first_line(error)}); is it a LoRA for this architecture?"
            ) from error
        touched = [c for c, names in pipeline.get_list_adapters().items() if name in names]
        if not touched:
            raise SourceError(
                f"LoRA {record.path} matched no layer of this {type(pipeline).__name__}; it is "
                "a LoRA for another architecture"
            )
        logger.info("LoRA %s (scale %s) fused into %s", record.path, lora.scale, touched)
        pipeline.fuse_lora(lora_scale=lora.scale, adapter_names=[name])
        pipeline.unload_lora_weights()


def peft_state_dict(folder: Path, denoiser: str) -> dict[str, Any]:
    """A peft adapter of the denoiser in diffusers' keys, with alpha / r folded into B."""
    from safetensors.torch import load_file

    config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UnsupportedError(
            f"LoRA {folder}: per-layer ranks or alphas (rank_pattern / alpha_pattern) are not "
            "supported; save the adapter with one r and lora_alpha"
        )
    rank = int(config["r"])
    scaling = float(config.get("lora_alpha", rank)) / (
        rank**0.5 if config.get("use_rslora") else rank
    )
    state = {}
    for key, tensor in load_file(str(folder / PEFT_WEIGHTS)).items():
        name = key.removeprefix("base_model.model.")
        state[f"{denoiser}.{name}"] = tensor * scaling if ".lora_B." in name else tensor
    return state
