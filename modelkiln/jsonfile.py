"""Reading a JSON object from a file, with the one-line errors every caller needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelkiln.errors import KilnError


def read_json_object(
    path: Path, error: type[KilnError], what: str | None = None, fix: str = ""
) -> dict[str, Any]:
    """The JSON object in `path`. Unreadable, non-JSON or non-object content raises `error`
    naming `what` (default: the path) and ending with `fix` (e.g. "; rebuild the artifact")."""
    what = what or str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{what} is not valid JSON ({problem}){fix}") from problem
    except OSError as problem:
        raise error(f"cannot read {what} ({problem.strerror or problem}){fix}") from problem
    if not isinstance(data, dict):
        raise error(f"{what} must hold a JSON object, not {type(data).__name__}{fix}")
    return data
