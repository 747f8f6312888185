"""Silence third-party chatter while we call into it: the library never prints.

transformers and diffusers log through their own handlers, show tqdm bars while loading and
saving, and raise FutureWarnings about configs we cannot change; none of it is for our users.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import threading
import warnings
from collections.abc import Iterator
from typing import Any


class _Quiet:
    """The libraries' verbosity and the warning filters are process-wide: when several
    threads are quiet at once (pipelines shared between threads), the first one in silences
    them and the last one out restores them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: list[tuple[Any, int]] = []
        self.filters: contextlib.ExitStack | None = None

    def enter(self) -> None:
        with self.lock:
            self.depth += 1
            if self.depth > 1:
                return
            loggers = [m for m in (_logging("transformers"), _logging("diffusers")) if m]
            self.saved = [(module, module.get_verbosity()) for module in loggers]
            for module in loggers:
                module.set_verbosity_error()
                module.disable_progress_bar()
            self.filters = contextlib.ExitStack()
            self.filters.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth > 0:
                return
            if self.filters is not None:
                self.filters.close()
                self.filters = None
            for module, verbosity in self.saved:
                module.set_verbosity(verbosity)
                module.enable_progress_bar()
            self.saved = []


_QUIET = _Quiet()


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    _QUIET.enter()
    try:
        yield
    finally:
        _QUIET.exit()


def _logging(library: str) -> Any:
    """The library's logging helpers, or None when it is not installed."""
    try:
        return importlib.import_module(f"{library}.utils.logging")
    except ImportError:
        return None


@contextlib.contextmanager
def printing_into(buffer: io.StringIO, *, stderr: bool = False) -> Iterator[None]:
    """What a converter prints on stdout (and stderr, where it draws progress bars) goes into
    `buffer`, its warnings nowhere: the library never prints; callers log the buffer at debug
    level, and with an error."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(buffer))
        if stderr:
            stack.enter_context(contextlib.redirect_stderr(buffer))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        yield
