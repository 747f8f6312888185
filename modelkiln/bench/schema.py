"""The bench report's versioned JSON schema (report.schema.json beside this file) and its check."""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

from modelkiln.errors import ReportError, missing_backend
from modelkiln.jsonfile import read_json_object

SCHEMA_NAME = "modelkiln-bench-report"
SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")


@cache
def report_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return schema


def validate_report(report: Any, where: str = "report") -> None:
    """Raise ReportError naming the first field that breaks the schema."""
    try:
        import jsonschema
    except ImportError as error:
        raise missing_backend("jsonschema", "bench") from error
    if not isinstance(report, dict) or report.get("schema") != SCHEMA_NAME:
        raise ReportError(f'{where} is not a modelkiln bench report (no "schema": "{SCHEMA_NAME}")')
    version = report.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ReportError(
            f"{where} has schema_version {version!r}; this modelkiln reads version "
            f"{SCHEMA_VERSION}: re-run kiln bench with this version"
        )
    validator = jsonschema.Draft202012Validator(report_schema())
    problem = jsonschema.exceptions.best_match(validator.iter_errors(report))
    if problem is not None:
        path = "/".join(str(part) for part in problem.absolute_path) or "(top level)"
        raise ReportError(
            f"{where} does not match the bench report schema at {path}: {problem.message}"
        )
    non_finite = _non_finite(report)
    if non_finite is not None:
        # Python's json reads NaN and Infinity, which no measurement can be: a gate fed NaN
        # compares false both ways and would pass.
        raise ReportError(
            f"{where} has a number that is not finite at {non_finite}: measure again (kiln bench)"
        )


def _non_finite(value: Any, path: str = "") -> str | None:
    """The path of the first NaN or infinity in a parsed JSON document, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(top level)"
    items: Any = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        found = _non_finite(item, f"{path}/{key}" if path else str(key))
        if found is not None:
            return found
    return None


def read_report(path: str | Path) -> dict[str, Any]:
    """A report file, parsed and checked against the schema."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"no bench report at {path}: run kiln bench -o DIR first")
    report = read_json_object(path, ReportError)
    validate_report(report, str(path))
    return report
