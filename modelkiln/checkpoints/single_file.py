"""Single-file checkpoints (the original LDM / SGM / MMDiT layout A1111 and ComfyUI use) as
diffusers pipeline folders, so that every family loads them through its one folder path.

The architecture is read from the file's keys and shapes (diffusers' own
`infer_diffusers_model_type`, on the safetensors header: nothing is loaded for it). The
pipeline's configs and tokenizers, which a single file does not carry, come from `--config DIR`
(a diffusers folder of the same architecture: configs and tokenizers are enough) or else from
the architecture's reference repository on the Hub (configs and tokenizers only). diffusers'
`from_single_file` then loads the weights in the file's own dtype (an fp16 file is never held in
fp32) and the pipeline is saved, once per file and config, under $MODELKILN_CACHE/single-file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from modelkiln.checkpoints.header import read_header
from modelkiln.errors import SourceError, UnsupportedError, first_line, missing_backend
from modelkiln.records import SingleFileRecord

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# diffusers' architecture names -> the families modelkiln builds.
FAMILIES = {
    "v1": "sd",
    "v2": "sd",
    "inpainting": "sd",
    "inpainting_v2": "sd",
    "xl_base": "sdxl",
    "xl_refiner": "sdxl",
    "xl_inpaint": "sdxl",
    "playground-v2-5": "sdxl",
    "sd3": "sd3",
    "sd35_medium": "sd3",
    "sd35_large": "sd3",
    "flux-dev": "flux",
    "flux-schnell": "flux",
}
_CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]  # configs, vocabularies, sentencepiece


@dataclass(frozen=True)
class Inspection:
    model_type: str  # diffusers' name for the architecture
    dtype: str  # the floating dtype most of the file's parameters have


def is_single_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in (*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES)


def inspect_file(path: Path, *, allow_pickle: bool = False) -> Inspection:
    """The architecture and dtype of a checkpoint, from its header (safetensors) or its
    state dict (pickle, only when allowed)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    shapes, dtypes = _header(path, allow_pickle)
    try:
        model_type = str(infer_diffusers_model_type(shapes))
    except Exception as error:  # diffusers indexes keys it expects: a foreign file
        raise UnsupportedError(
            f"{path} is not a diffusion checkpoint diffusers recognises ({first_line(error)})"
        ) from error
    if model_type == "v1" and not any(k.startswith("model.diffusion_model.") for k in shapes):
        # diffusers' fallback when nothing matched: say what the file is not.
        raise UnsupportedError(
            f"{path} holds no diffusion model weights in the original layout "
            "(model.diffusion_model.*); single files are read for SD 1.x/2.x, SDXL, SD3 and "
            "Flux: for a transformers or timm model pass its directory (config.json + "
            "model.safetensors)"
        )
    if model_type not in FAMILIES:
        raise UnsupportedError(
            f"{path} is a '{model_type}' checkpoint; single files are supported for "
            f"{', '.join(sorted(FAMILIES))}"
        )
    return Inspection(model_type, _most_common(dtypes))


def stored_dtype(files: Sequence[Path]) -> str:
    """The floating dtype most tensors of these safetensors files are stored in."""
    dtypes: list[str] = []
    for file in files:
        dtypes += _header(file, allow_pickle=False)[1]
    return _most_common(dtypes)


def _most_common(dtypes: list[str]) -> str:
    return max(set(dtypes), key=dtypes.count) if dtypes else "float32"


class _ShapeView(Mapping[str, Any]):
    """Key -> an object with the tensor's .shape, which is all diffusers' detection reads."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self._shapes = shapes

    def __getitem__(self, key: str) -> Any:
        return _Shaped(self._shapes[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


@dataclass(frozen=True)
class _Shaped:
    shape: tuple[int, ...]


_FLOATING = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _header(path: Path, allow_pickle: bool) -> tuple[_ShapeView, list[str]]:
    """(key -> shape view, floating dtypes) of a checkpoint; a corrupt file is a SourceError."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _pickled_header(path, allow_pickle)
    header = read_header(path, fix="download it again")
    shapes = {key: shape for key, (shape, _) in header.items()}
    dtypes = [_FLOATING[code] for _, code in header.values() if code in _FLOATING]
    return _ShapeView(shapes), dtypes


def _pickled_header(path: Path, allow_pickle: bool) -> tuple[_ShapeView, list[str]]:
    if not allow_pickle:
        raise SourceError(
            f"{path} is a pickle checkpoint; pickle can run arbitrary code when loaded: use "
            "its .safetensors version, or pass --allow-pickle if you trust it"
        )
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        state = load_single_file_checkpoint(str(path))
    except Exception as error:  # torch.load raises many types for a damaged file
        raise SourceError(f"cannot read {path} ({first_line(error)})") from error
    tensors = {k: v for k, v in state.items() if hasattr(v, "shape")}
    dtypes = [str(v.dtype).removeprefix("torch.") for v in tensors.values()]
    floating = [d for d in dtypes if d in _FLOATING.values()]
    return _ShapeView({k: tuple(v.shape) for k, v in tensors.items()}), floating


def config_folder(inspection: Inspection, config: str | Path | None) -> tuple[Path, str]:
    """The diffusers folder whose configs and tokenizers go with the checkpoint, and how the
    manifest names it (the folder, or the Hub repository it was fetched from)."""
    if config is not None:
        folder = Path(config).expanduser()
        if not (folder / "model_index.json").is_file():
            raise SourceError(
                f"--config {config}: expected a diffusers pipeline folder with "
                "model_index.json (its configs and tokenizers; weights are not needed)"
            )
        return folder.resolve(), str(folder.resolve())
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS

    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[inspection.model_type]["pretrained_model_name_or_path"]
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo, allow_patterns=_CONFIG_PATTERNS)
    except ImportError as error:
        raise missing_backend("huggingface-hub", "build") from error
    except Exception as error:  # offline, unknown repo, gated repo: all "cannot fetch"
        raise SourceError(
            f"a '{inspection.model_type}' single file needs its pipeline's configs and "
            f"tokenizers, and fetching them from {repo} failed ({first_line(error)}); pass "
            "--config DIR, a diffusers folder of the same architecture"
        ) from error
    return Path(local), repo


def load_into_folder(
    path: Path,
    destination: Path,
    *,
    config: str | Path | None,
    allow_pickle: bool = False,
    digest: str | None = None,
) -> SingleFileRecord:
    """Write the checkpoint at `path` as a diffusers pipeline folder at `destination`."""
    inspection = inspect_file(path, allow_pickle=allow_pickle)
    folder, config_name = config_folder(inspection, config)
    pipeline_class = _pipeline_class(folder)
    import torch

    from modelkiln.quiet import quiet_libraries

    with quiet_libraries():
        try:
            pipeline = pipeline_class.from_single_file(
                str(path),
                config=str(folder),
                local_files_only=True,
                torch_dtype=getattr(torch, inspection.dtype),
            )
        except Exception as error:  # diffusers' loaders raise many types for a mismatch
            raise SourceError(
                f"cannot load {path} as a {pipeline_class.__name__} with the configs of "
                f"{folder} ({first_line(error)}); pass --config with a folder of the "
                "checkpoint's architecture"
            ) from error
        _require_loaded(pipeline, path)
        pipeline.save_pretrained(str(destination), safe_serialization=True)
    return SingleFileRecord(
        path=str(path.resolve()),
        sha256=digest or _sha256(path),
        model_type=inspection.model_type,
        pipeline=pipeline_class.__name__,
        dtype=inspection.dtype,
        config=config_name,
    )


def _require_loaded(pipeline: Any, path: Path) -> None:
    """Every weight loaded. diffusers builds the text encoders on the meta device and fills
    them from the file; a weight the file keeps once for two modules (T5's embed_tokens, tied
    to `shared`) stays on meta until the model ties it again."""
    for name, component in pipeline.components.items():
        tensors = getattr(component, "named_parameters", None)
        if tensors is None:
            continue
        if any(t.is_meta for _, t in tensors()) and hasattr(component, "tie_weights"):
            component.tie_weights()
        missing = [n for n, t in [*tensors(), *component.named_buffers()] if t.is_meta]
        if missing:
            raise SourceError(
                f"{path} lacks {name} weights ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}); is it a complete checkpoint?"
            )


def _pipeline_class(folder: Path) -> Any:
    import diffusers

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    name = str(index.get("_class_name"))
    pipeline_class = getattr(diffusers, name, None)
    if pipeline_class is None or not hasattr(pipeline_class, "from_single_file"):
        raise UnsupportedError(
            f"{folder} describes a {name}, which diffusers cannot load from a single file"
        )
    return pipeline_class


def cached_folder(
    path: Path, *, config: str | Path | None, allow_pickle: bool = False
) -> tuple[Path, SingleFileRecord]:
    """The diffusers folder of a single file, converted once per (file, config) and kept
    under $MODELKILN_CACHE/single-file; the file's record for the manifest."""
    from modelkiln.env import cache_home
    from modelkiln.outputs import atomic_directory

    file_digest = _sha256(path)
    key = hashlib.sha256(f"{file_digest}\n{_config_digest(config)}".encode()).hexdigest()[:20]
    target = cache_home() / "single-file" / key
    record_file = target / "single_file.json"
    if record_file.is_file():
        record = SingleFileRecord(**json.loads(record_file.read_text(encoding="utf-8")))
        # The same bytes may have moved: the manifest names the file this build read.
        return target, replace(record, path=str(path.resolve()))
    logger.info("converting %s to a diffusers folder in %s", path, target)
    with atomic_directory(target, marker=None) as staging:
        record = load_into_folder(
            path, staging, config=config, allow_pickle=allow_pickle, digest=file_digest
        )
        (staging / record_file.name).write_text(json.dumps(asdict(record)), encoding="utf-8")
    return target, record


def _config_digest(config: str | Path | None) -> str:
    """What a --config folder gives a conversion (its configs and tokenizer files), so that
    an edited folder converts again; "" for the Hub's (fetched by revision)."""
    if config is None:
        return ""
    folder = Path(config).expanduser().resolve()
    digest = hashlib.sha256(str(folder).encode())
    for pattern in _CONFIG_PATTERNS:
        for file in sorted(folder.rglob(pattern)):
            digest.update(f"{file.relative_to(folder)}\n".encode() + file.read_bytes())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    from modelkiln.artifact import sha256_file

    return sha256_file(path)
