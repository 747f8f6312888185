"""Progress reporting: the library announces long steps, the CLI decides how to show them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

Advance = Callable[[int], None]


class Progress(Protocol):
    def task(
        self, description: str, total: int | None = None
    ) -> contextlib.AbstractContextManager[Advance]:
        """A step that may take a while; the yielded callable advances it by n units."""
        ...


class NullProgress:
    """The library default: report nothing."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield _ignore


def _ignore(steps: int = 1) -> None:
    """Advance nothing."""
