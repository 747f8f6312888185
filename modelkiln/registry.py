"""One small lazy registry used for backends, model families and quantization schemes.

Entries are dotted import paths ("modelkiln.runtimes.openvino:OpenVINOBackend"), so that
listing names (``kiln --help``, profile validation) never imports a heavy backend. An
extension may also register an object it already holds (a test's throwaway backend).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from modelkiln.errors import UnsupportedError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entries: Mapping[str, str | T]) -> None:
        self.kind = kind
        self._entries: dict[str, str | T] = dict(entries)
        self._loaded: dict[str, T] = {}

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def register(self, name: str, target: str | T) -> None:
        """Add an entry: "package.module:Attribute", or the object itself. Extensions call
        this (and `unregister`), never a private dict."""
        if name in self._entries and self._entries[name] != target:
            raise ValueError(f"{self.kind} '{name}' is already registered as {self._entries[name]}")
        self._entries[name] = target

    def unregister(self, name: str) -> None:
        """Remove an entry (a test's throwaway extension); unknown names are ignored."""
        self._entries.pop(name, None)
        self._loaded.pop(name, None)

    def get(self, name: str) -> T:
        """Import and return the entry, or raise with the known names and a did-you-mean."""
        if name not in self._entries:
            known = ", ".join(sorted(self._entries))
            raise UnsupportedError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; known: {known}"
            )
        if name not in self._loaded:
            target = self._entries[name]
            if isinstance(target, str):
                module_name, _, attribute = target.partition(":")
                module = importlib.import_module(module_name)
                self._loaded[name] = getattr(module, attribute)
            else:
                self._loaded[name] = target
        return self._loaded[name]


def load_object(target: object) -> object:
    """The attribute a dotted "package.module:Attribute" path names (imported now); any
    other target is the object itself."""
    if not isinstance(target, str):
        return target
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)
