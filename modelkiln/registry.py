"""One small lazy registry used for model families, exporters and runtimes.

Entries are dotted import paths ("modelkiln.runtimes.openvino:OpenVINORuntime"), so that
listing names (``kiln --help``, profile validation) never imports a heavy backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from modelkiln.errors import UnsupportedError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entries: Mapping[str, str]) -> None:
        self.kind = kind
        self._entries = dict(entries)
        self._loaded: dict[str, T] = {}

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def register(self, name: str, target: str) -> None:
        """Add an entry ("package.module:Attribute"); extensions call this, not a private dict."""
        if name in self._entries and self._entries[name] != target:
            raise ValueError(f"{self.kind} '{name}' is already registered as {self._entries[name]}")
        self._entries[name] = target

    def get(self, name: str) -> T:
        """Import and return the entry, or raise with the known names and a did-you-mean."""
        if name not in self._entries:
            known = ", ".join(sorted(self._entries))
            raise UnsupportedError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; known: {known}"
            )
        if name not in self._loaded:
            module_name, _, attribute = self._entries[name].partition(":")
            module = importlib.import_module(module_name)
            self._loaded[name] = getattr(module, attribute)
        return self._loaded[name]
