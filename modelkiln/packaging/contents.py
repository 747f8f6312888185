"""Which of an artifact's files a bundle holds: what the runtime and the pipeline read.

Everything else the artifact directory may hold (torch reference weights, notes, ...) stays
out. The selection works on kiln.json's file list, so it never picks up a stray file.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from modelkiln.artifact import Manifest
from modelkiln.errors import ArtifactError, UnsupportedError

# family -> configs read beside the models (a trailing "/" takes the whole folder).
# ViT's own pipelines read preprocessing and labels from kiln.json; config.json and
# preprocessor_config.json are what optimum's ORT/OV classes load. Diffusion reads
# model_index.json, scheduler/scheduler_config.json and the CLIP tokenizer folders.
FAMILY_CONFIGS: dict[str, tuple[str, ...]] = {
    "vit": ("config.json", "preprocessor_config.json"),
    "sd": ("model_index.json", "scheduler/", "tokenizer/"),
    "sdxl": ("model_index.json", "scheduler/", "tokenizer/", "tokenizer_2/"),
}

# format -> files its runtime opens beside a component's entry ({stem}: the entry's stem).
# A directory entry (a Core ML .mlpackage) brings everything under it instead.
COMPANIONS: dict[str, tuple[str, ...]] = {
    "onnx": ("{stem}.onnx_data",),  # external weights, optimum's naming
    "openvino": ("{stem}.bin",),  # the IR's weights
    # the engine's record, and the ONNX it rebuilds from on another GPU or TensorRT version
    "tensorrt": ("engine.json", "model.onnx", "model.onnx_data"),
}

# Each component's config.json beside its model: the diffusion pipeline reads it.
COMPONENT_CONFIG = "config.json"


def bundle_files(manifest: Manifest) -> list[str]:
    """The artifact-relative paths of the files a bundle of this artifact holds (not kiln.json)."""
    configs = FAMILY_CONFIGS.get(manifest.family)
    if configs is None:
        raise UnsupportedError(
            f"packaging does not know which configs a {manifest.family} artifact's pipeline "
            f"reads; known families: {', '.join(FAMILY_CONFIGS)} "
            "(add it to FAMILY_CONFIGS in modelkiln/packaging/contents.py)"
        )
    listed = manifest.files
    selected: set[str] = set()
    for record in manifest.components.values():
        entry = PurePosixPath(record.entry)
        inside = [name for name in listed if name.startswith(f"{entry.as_posix()}/")]
        if entry.as_posix() not in listed and not inside:
            raise ArtifactError(
                f"kiln.json lists no file for component {record.name}'s entry {record.entry}; "
                "rebuild the artifact"
            )
        companions = [p.format(stem=entry.stem) for p in COMPANIONS.get(manifest.format, ())]
        beside = [entry, *(entry.parent / name for name in companions)]
        beside.append(entry.parent / COMPONENT_CONFIG)
        selected.update(inside)
        selected.update(path.as_posix() for path in beside if path.as_posix() in listed)
    for pattern in configs:
        if pattern.endswith("/"):
            selected.update(name for name in listed if name.startswith(pattern))
        elif pattern in listed:
            selected.add(pattern)
    return sorted(selected)
