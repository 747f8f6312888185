"""`kiln convert`: a diffusers pipeline folder to a single file and back, written atomically
(a failed conversion leaves nothing at the destination)."""

from __future__ import annotations

from pathlib import Path

from modelkiln.checkpoints.original_layout import write_single_file
from modelkiln.checkpoints.single_file import is_single_file, load_into_folder
from modelkiln.errors import SourceError
from modelkiln.outputs import atomic_directory, check_writable


def convert_checkpoint(
    source: Path, destination: Path, *, config: Path | None = None, allow_pickle: bool = False
) -> Path:
    """Write `source` in the other layout at `destination` (which must not exist yet)."""
    if destination.exists():
        raise SourceError(
            f"{destination} exists; conversion never overwrites: remove it or pick another path"
        )
    if source.is_dir():
        if config is not None:
            raise SourceError("--config is for reading a single file; drop it for a folder")
        if destination.suffix.lower() != ".safetensors":
            raise SourceError(
                f"{destination}: a folder converts to a single .safetensors file; name it "
                "*.safetensors"
            )
        check_writable(destination, folder=False)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f".{destination.name}.partial")
        try:
            write_single_file(source, partial)
            partial.replace(destination)
        finally:
            partial.unlink(missing_ok=True)
        return destination
    if not is_single_file(source):
        raise SourceError(
            f"{source} is neither a diffusers pipeline folder nor a single-file checkpoint "
            "(.safetensors, or .ckpt with --allow-pickle)"
        )
    with atomic_directory(destination, marker="model_index.json") as staging:
        load_into_folder(source, staging, config=config, allow_pickle=allow_pickle)
    return destination
