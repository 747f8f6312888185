"""Turn what the user typed (hub id, local dir, timm:NAME, hf-hub:REPO) into a local directory.

Hub sources are fetched with huggingface_hub into its cache (only configs and safetensors
unless pickle is allowed), so that every family loads from a local directory through the
library's own `from_pretrained` / `timm.create_model` path.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkiln.artifact import sha256_file
from modelkiln.checkpoints.header import read_header
from modelkiln.checkpoints.single_file import PICKLE_SUFFIXES, cached_folder, is_single_file
from modelkiln.errors import (
    SourceError,
    UnsupportedError,
    did_you_mean,
    require_utf8_path,
)
from modelkiln.jsonfile import read_json_object
from modelkiln.records import LoraRecord, SingleFileRecord, SourceRecord

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = tuple(f"*{suffix}" for suffix in PICKLE_SUFFIXES)
_CONFIGS = ("*.json", "*.txt", "*.model")


@dataclass(frozen=True)
class ResolvedSource:
    spec: str  # exactly what the user passed
    local_dir: Path
    hub_id: str | None = None
    revision: str | None = None  # the commit a hub source resolved to
    allow_pickle: bool = False
    single_file: SingleFileRecord | None = None  # the checkpoint local_dir was converted from
    loras: tuple[LoraRecord, ...] = ()  # fused into local_dir, in order

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.local_dir / name
        if not path.is_file():
            return None
        return read_json_object(path, SourceError)

    def describe(self) -> SourceRecord:
        """What kiln.json records of the source (the build adds the weights' hashes)."""
        return SourceRecord(
            self.spec,
            self.hub_id,
            self.revision,
            str(self.local_dir),
            single_file=self.single_file,
            loras=self.loras,
        )


def resolve_source(
    source: str | Path,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    config: str | Path | None = None,
) -> ResolvedSource:
    """`config`: the diffusers folder whose configs and tokenizers a single-file checkpoint
    is loaded with (default: its architecture's Hub repository)."""
    spec = str(source)
    path = Path(spec).expanduser()
    if is_single_file(path):
        return _from_single_file(spec, path, config, allow_pickle)
    if config is not None:
        raise SourceError(
            f"--config is for single-file checkpoints; '{spec}' is not one (a .safetensors "
            "file, or .ckpt with --allow-pickle): drop --config"
        )
    if spec.startswith("timm:"):
        hub_id = _timm_hub_id(spec.removeprefix("timm:"))
        return _from_hub(spec, hub_id, revision, allow_pickle)
    if spec.startswith("hf-hub:"):
        return _from_hub(spec, spec.removeprefix("hf-hub:"), revision, allow_pickle)
    if path.is_dir():
        require_utf8_path(path, SourceError, "rename it (or a folder above it)")
        return ResolvedSource(spec, path.resolve(), allow_pickle=allow_pickle)
    if path.is_file():
        raise UnsupportedError(
            f"'{spec}' is not a checkpoint modelkiln reads ({path.suffix or 'no suffix'}): "
            "pass a model directory, or a single-file .safetensors checkpoint"
        )
    if _HUB_ID.match(spec) and not Path(spec.split("/")[0]).is_dir():
        return _from_hub(spec, spec, revision, allow_pickle)
    if path.parent.is_dir() and str(path.parent) != ".":
        raise SourceError(f"no such model directory: '{spec}' ({path.parent} has no '{path.name}')")
    raise SourceError(
        f"'{spec}' is not a local directory, a Hugging Face Hub id (org/name), "
        "timm:NAME or hf-hub:org/name"
    )


def _from_single_file(
    spec: str, path: Path, config: str | Path | None, allow_pickle: bool
) -> ResolvedSource:
    require_utf8_path(path, SourceError, "rename it (or a folder above it)")
    folder, record = cached_folder(path, config=config, allow_pickle=allow_pickle)
    logger.info("%s is loaded from its diffusers conversion in %s", spec, folder)
    return ResolvedSource(spec, folder, single_file=record)


def find_weights(directory: Path, *, allow_pickle: bool) -> list[Path]:
    """The weight files of a model directory: safetensors, or pickle files only when allowed."""
    safe = sorted(p for pattern in SAFE_WEIGHTS for p in directory.glob(pattern))
    if safe:
        for path in safe:
            _require_safetensors(path)
        return safe
    pickled = sorted(p for pattern in PICKLE_WEIGHTS for p in directory.glob(pattern))
    if pickled and not allow_pickle:
        raise SourceError(
            f"{directory} has only pickle weights ({', '.join(p.name for p in pickled)}); "
            "pickle can run arbitrary code when loaded: convert them to safetensors or pass "
            "--allow-pickle if you trust the source"
        )
    if not pickled:
        raise SourceError(f"no weights in {directory}: expected model.safetensors")
    return pickled


def _require_safetensors(path: Path) -> None:
    """Refuse a damaged weights file now, with its name, not deep inside a library's loader."""
    read_header(path, fix="download or save the weights again")


def weights_digest(files: list[Path]) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in files}


def _timm_hub_id(name: str) -> str:
    try:
        import timm
    except ImportError as error:
        from modelkiln.errors import missing_backend

        raise missing_backend("timm", "timm") from error
    try:
        config = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # timm raises for an unknown architecture or tag
        config = None
    if config is None:
        known = timm.list_models(f"{name.split('.')[0]}*", pretrained=True) or timm.list_models(
            pretrained=True
        )
        raise SourceError(f"timm has no pretrained model '{name}'{did_you_mean(name, known)}")
    if not config.hf_hub_id:
        raise SourceError(
            f"timm model '{name}' has no weights on the Hugging Face Hub; download them and "
            "pass a local directory (config.json + model.safetensors)"
        )
    return str(config.hf_hub_id)


def _from_hub(spec: str, hub_id: str, revision: str | None, allow_pickle: bool) -> ResolvedSource:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        from modelkiln.errors import missing_backend

        raise missing_backend("huggingface-hub", "build") from error
    patterns = [*_CONFIGS, *SAFE_WEIGHTS, *(PICKLE_WEIGHTS if allow_pickle else ())]
    try:
        local = Path(snapshot_download(hub_id, revision=revision, allow_patterns=patterns))
    except Exception as error:  # hub, network and cache errors all mean "cannot fetch"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SourceError(
            f"cannot fetch '{hub_id}' from the Hugging Face Hub ({type(error).__name__}: "
            f"{reason}); check the id and your network, or pass a local directory"
        ) from error
    logger.info("resolved %s to %s", spec, local)
    return ResolvedSource(
        spec, local, hub_id=hub_id, revision=local.name, allow_pickle=allow_pickle
    )
