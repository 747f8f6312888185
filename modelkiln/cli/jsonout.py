"""`--json`: every command's result as one JSON document on stdout, for scripts and CI.

The fields of each command's document are listed in docs/cli.md (a test reads them from
there). Progress, warnings and errors stay on stderr, so stdout parses whatever happened.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

JSON_OPTION = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the result as one JSON document on stdout (its fields: docs/cli.md); "
    "progress and warnings stay on stderr.",
)


def emit_json(document: Any) -> None:
    """Print `document` as the command's one JSON document (indent 2, strict JSON)."""
    click.echo(json.dumps(_finite(document), indent=2, allow_nan=False, default=_encode))


def paths(items: Any) -> list[str]:
    """Paths as the strings a JSON document holds."""
    return [str(item) for item in items]


def _finite(value: Any) -> Any:
    # JSON has no NaN or infinity (json.loads accepts them, most parsers do not): null, as
    # kiln.json writes an infinite SQNR.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _encode(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
