"""One component in memory at a time: sessions opened when called, closed when another opens.

A pipeline holds every component's session from load to close. For a model near the machine's
memory that is what does not fit: SD 3.5 Large's int4 ONNX artifact holds its text encoders'
4.5 GB of weights through denoising, where a 1024x1024 step's attention needs the room (killed
at 24 GB). `load(..., low_memory=True)` (`kiln generate --low-memory`) gives the pipeline
these sessions instead: the text encoders, the denoiser and the VAE each load when the
pipeline first calls them and are let go when the next one loads, as diffusers'
enable_model_cpu_offload does on GPUs. Each generation then reloads every component: the
price of the memory, in seconds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from modelkiln.env import release_memory
from modelkiln.records import TensorSpec
from modelkiln.runtimes.base import Session


class Residency:
    """The one session of a group that is open; opening another closes it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.open: OnDemandSession | None = None


class OnDemandSession(Session):
    """A session whose backend model is opened by `opener` at its first call and closed when
    another session of its `residency` opens (or on release/close)."""

    def __init__(
        self,
        opener: Callable[[], Session],
        name: str,
        inputs: Mapping[str, TensorSpec],
        outputs: Mapping[str, TensorSpec],
        residency: Residency,
    ) -> None:
        super().__init__(name, inputs, outputs)
        self.opener = opener
        self.residency = residency
        self.session: Session | None = None
        self.last_info: dict[str, Any] = {}

    @property
    def info(self) -> dict[str, Any]:
        return self.session.info if self.session is not None else self.last_info

    def _run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        with self.residency.lock:
            session = self._opened()
            # The feeds were checked against the same specs: the backend runs them directly.
            return session._run(feeds, output_names)

    def _opened(self) -> Session:
        if self.session is None:
            if self.residency.open is not None and self.residency.open is not self:
                self.residency.open.release()
            self.session = self.opener()
            self.residency.open = self
        return self.session

    def release(self) -> None:
        """Close the backend model; the next call opens it again."""
        with self.residency.lock:
            if self.session is not None:
                self.last_info = self.session.info
                self.session.close()
                self.session = None
                release_memory()  # the backend's freed heap, back to the system now
            if self.residency.open is self:
                self.residency.open = None

    def close(self) -> None:
        self.release()
