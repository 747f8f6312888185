"""Typed frozen dataclasses from TOML tables, and back: what the profile schema is made of.

Backends and quantization schemes parse their own sections with `parse_section`, so that a
mistake in any part of a profile reads the same: the key path, what was found, a did-you-mean.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints

from modelkiln.errors import ProfileError, did_you_mean
from modelkiln.profiles.history import MOVED_IN_V2

T = TypeVar("T")


def parse_section(
    cls: type[T],
    data: Any,
    *,
    key_path: str,
    origin: str,
    exclude: frozenset[str] = frozenset(),
) -> T:
    """A frozen dataclass from a TOML table: unknown keys, wrong types and bad choices raise
    ProfileError naming the key path. Backends and schemes parse their own sections with it;
    `exclude`: fields the caller fills itself."""
    section = f"[{key_path.rstrip('.')}]" if key_path else "the top level"
    if not isinstance(data, Mapping):
        raise ProfileError(f"{origin}: {section} must be a table, got {data!r}")
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cast(Any, cls)) if f.init and f.name not in exclude]
    for key in data:
        if key not in known:
            moved = MOVED_IN_V2.get(f"{key_path}{key}")
            hint = f": since schema_version 2 it is {moved[0]}" if moved else ""
            raise ProfileError(
                f"{origin}: unknown key '{key_path}{key}'{did_you_mean(key, known)}{hint}; "
                f"known keys in {section}: {', '.join(known)}"
            )
    kwargs = {
        name: _coerce(hints[name], data[name], f"{key_path}{name}", origin)
        for name in known
        if name in data
    }
    missing = [
        f.name
        for f in fields(cast(Any, cls))
        if f.name in known
        and f.name not in kwargs
        and f.default is MISSING
        and f.default_factory is MISSING
    ]
    if missing:
        raise ProfileError(f"{origin}: missing required key(s): {', '.join(missing)}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, origin: str) -> Any:
    origin_type = get_origin(hint)
    if is_dataclass(hint):
        return parse_section(cast(type, hint), value, key_path=f"{key}.", origin=origin)
    if origin_type in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        return _coerce(options[0], value, key, origin)
    if origin_type is Literal:
        choices = get_args(hint)
        if value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise ProfileError(
                f"{origin}: {key} = {value!r} is not one of {shown}"
                f"{did_you_mean(str(value), map(str, choices))}"
            )
        return value
    if origin_type is dict:
        if not isinstance(value, Mapping):
            raise ProfileError(f"{origin}: [{key}] must be a table, got {value!r}")
        _, item_type = get_args(hint)
        return {
            name: _coerce(item_type, item, f"{key}.{name}", origin) for name, item in value.items()
        }
    if origin_type is tuple:
        if not isinstance(value, list | tuple):
            raise ProfileError(f"{origin}: {key} must be a list, got {value!r}")
        (item_type, _) = get_args(hint)
        return tuple(_coerce(item_type, item, key, origin) for item in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (str, int, float, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ProfileError(
                f"{origin}: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}"
            )
        if hint is float and not math.isfinite(value):
            # TOML has nan and inf: neither is a bound, a tolerance or a ratio.
            raise ProfileError(f"{origin}: {key} must be a finite number, got {value!r}")
        return value
    raise TypeError(f"profile field {key} has an unsupported type {hint!r}")  # a bug, not input


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `--set dotted.key=value`; the value is parsed as TOML, else taken as a string.
    An empty value (`--set validation.min_psnr_db=`) removes the key: its default applies."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ProfileError(f"--set expects key=value (e.g. validation.atol=1e-3), got '{item}'")
    if not raw.strip():
        *sections, leaf = key.split(".")
        table: Any = data
        for section in sections:
            table = table.get(section) if isinstance(table, dict) else None
        if isinstance(table, dict):
            table.pop(leaf, None)
        return
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    *sections, leaf = key.split(".")
    target = data
    for section in sections:
        child = target.setdefault(section, {})
        if not isinstance(child, dict):
            raise ProfileError(f"--set {key}: '{section}' is not a section of the profile")
        target = child
    target[leaf] = value


def require_values(table: Mapping[str, Any], where: str, origin: str) -> None:
    """An open table (a backend's section, a scheme's options) holds values and lists of
    values: every setting its reader takes is one, and a table there is a misplaced section.
    Its numbers are finite, as everywhere in a profile."""

    def problem(value: Any) -> str | None:
        if isinstance(value, list | tuple):
            return next((p for item in value if (p := problem(item)) is not None), None)
        if isinstance(value, Mapping):
            return "must be a value or a list of values, not a table"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        return None

    for key, value in table.items():
        if (found := problem(value)) is not None:
            raise ProfileError(f"{origin}: {where} {key} {found}")


def without_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: without_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, tuple):
        return list(data)
    return data


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Tables of scalars and flat lists, nested tables as [a.b] sections.

    What it writes reads back to the same data: keys that are not bare TOML keys (empty,
    dotted, spaced) are quoted, strings escape what TOML does not allow raw, and an empty
    nested table keeps its header ([components.vae] with nothing set). An empty top-level
    table is left out: it means what its absence means.
    """
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}"
        for k, v in data.items()
        if not isinstance(v, dict) and not _is_table_array(v)
    ]
    for section, values in data.items():
        if not isinstance(values, dict) or not (values or prefix):
            continue
        name = f"{prefix}{_toml_key(section)}"
        text = to_toml(values, f"{name}.")
        tables_only = values and all(isinstance(v, dict) for v in values.values())
        header = [] if tables_only else [f"[{name}]"]
        lines += ["", *header, *text.rstrip("\n").split("\n")]
    for key, items in data.items():
        if _is_table_array(items):  # [[lora]]: one table per entry
            for item in items:
                text = to_toml(item).rstrip("\n")
                lines += ["", f"[[{prefix}{_toml_key(key)}]]", *text.split("\n")]
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, list | tuple) and bool(value) and all(isinstance(v, dict) for v in value)
    )


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON's escapes are a subset of TOML's basic-string escapes; TOML also bans raw DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")
