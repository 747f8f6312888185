"""A pool of backend handles that are not safe to share between threads (OpenVINO infer
requests, TensorRT execution contexts, a Core ML model): each call borrows one, so concurrent
calls never share a handle, and up to `size` of them run at once."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Pool(Generic[T]):
    """Up to `size` handles, made on first need; a borrower waits while all are out."""

    def __init__(self, make: Callable[[], T], size: int = 1) -> None:
        if size < 1:
            raise ValueError(f"a pool holds at least one handle, not {size}")
        self._make = make
        self.size = size
        self._idle: list[T] = []
        self._made = 0
        self._ready = threading.Condition()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[T]:
        handle = self._take()
        try:
            yield handle
        finally:
            with self._ready:
                self._idle.append(handle)
                self._ready.notify()

    def _take(self) -> T:
        with self._ready:
            while not self._idle and self._made >= self.size:
                self._ready.wait()
            if self._idle:
                return self._idle.pop()
            self._made += 1
        try:
            return self._make()  # outside the lock: making one may take a while
        except BaseException:
            with self._ready:
                self._made -= 1
                self._ready.notify()
            raise

    def clear(self) -> None:
        """Drop the idle handles (the session is closing)."""
        with self._ready:
            self._idle.clear()
