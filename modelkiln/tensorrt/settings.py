"""[tensorrt]: the engine build's own profile section (the optimization profile comes from
[shapes]). Its own module: the recipe (build side) and the backend descriptor (runtime side)
both read it, and neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from modelkiln.backends import BackendSettings
from modelkiln.errors import ProfileError


@dataclass(frozen=True)
class TensorRTSettings(BackendSettings):
    """[tensorrt]: the engine build of format 'tensorrt'."""

    section: ClassVar[str] = "tensorrt"
    workspace_mb: int | None = None  # builder memory pool; None: TensorRT's default (all)
    optimization_level: int = 3  # builder_optimization_level 0-5: build time vs engine speed
    timing_cache: bool = True  # reuse kernel timings across builds on the same GPU
    engine_cache: bool = True  # skip the build when GPU, TensorRT, ONNX and recipe match

    def check(self, origin: str) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise ProfileError(
                f"{origin}: tensorrt.optimization_level must be 0-5, got {self.optimization_level}"
            )
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise ProfileError(
                f"{origin}: tensorrt.workspace_mb must be >= 1, got {self.workspace_mb}"
            )
