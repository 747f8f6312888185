"""A safetensors file's header (each tensor's shape and dtype) without reading any tensor:
what source checks, single-file detection and LoRA layouts read, and one error for a file
that is not safetensors."""

from __future__ import annotations

from pathlib import Path

from modelkiln.errors import SourceError, first_line

# key -> (shape, safetensors dtype code: "F16", "BF16", "F32", "I64", ...)
Header = dict[str, tuple[tuple[int, ...], str]]


def read_header(path: Path, *, fix: str, what: str = "") -> Header:
    """The tensors `path` holds; SourceError naming it (as `what`) and `fix` if it is not a
    valid safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as weights:
            header: Header = {}
            for key in weights.keys():  # noqa: SIM118 - safe_open is not a dict
                piece = weights.get_slice(key)
                header[key] = (tuple(piece.get_shape()), str(piece.get_dtype()))
            return header
    except Exception as error:  # safetensors' own error type is not an OSError
        raise SourceError(
            f"{what}{path} is not a valid safetensors file ({first_line(error)}); {fix}"
        ) from error
