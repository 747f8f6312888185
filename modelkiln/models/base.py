"""What a model family provides: detection, loading into ComponentSpecs, reference reloading."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.specs import ComponentSpec

if TYPE_CHECKING:
    import torch

    from modelkiln.profiles import Profile
    from modelkiln.sources import ResolvedSource


@dataclass
class LoadedModel:
    family: str
    task: str  # resolved, never "auto"
    components: list[ComponentSpec]
    # Torch-free facts for the pipelines: preprocessing, labels, prefix tokens, sizes.
    model_info: dict[str, Any]
    # Files copied verbatim to the artifact root (config.json, preprocessor_config.json, ...).
    config_files: dict[str, bytes] = field(default_factory=dict)
    # name -> sha256 of the source weights that were loaded.
    weights: dict[str, str] = field(default_factory=dict)


class ModelFamily(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]  # what it covers, for "unsupported model" errors
    # What calibration and end-to-end validation feed it: image files, or text prompts.
    real_inputs: ClassVar[str] = "images"

    @classmethod
    @abstractmethod
    def matches(cls, source: ResolvedSource) -> bool:
        """Cheap check on the source's config files; must not import torch."""

    @classmethod
    @abstractmethod
    def load(cls, source: ResolvedSource, profile: Profile) -> LoadedModel:
        """Describe every component to export (its module may load lazily, when asked)."""

    @classmethod
    @abstractmethod
    def reference_module(
        cls, model_dir: Path, component: str, settings: Mapping[str, Any]
    ) -> torch.nn.Module:
        """Rebuild one component's torch wrapper from weights saved by its save_reference."""
