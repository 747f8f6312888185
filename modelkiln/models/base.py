"""What a model family provides: detection, loading into ComponentSpecs, its pipelines, and
what calibration, the end-to-end gate, benchmarks and bundles need to know of it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelkiln.errors import ProfileError, UnsupportedError, did_you_mean
from modelkiln.registry import load_object
from modelkiln.specs import ComponentSpec

if TYPE_CHECKING:
    from collections.abc import Collection

    import torch

    from modelkiln.pipelines.base import Pipeline
    from modelkiln.profiles import Profile
    from modelkiln.records import Manifest
    from modelkiln.sources import ResolvedSource

IMAGES = "images"
PROMPTS = "prompts"


@dataclass
class LoadedModel:
    family: str
    task: str  # resolved, never "auto"
    pipeline: str  # the name of the family's pipeline that runs it (recorded in kiln.json)
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
    # The tasks a profile's model.task may name ("auto" lets load() decide).
    tasks: ClassVar[tuple[str, ...]]
    # Its pipelines by name ("module:Class", or the class); kiln.json records the one an
    # artifact runs.
    pipelines: ClassVar[Mapping[str, str | type[Pipeline]]]
    # What calibration and end-to-end validation feed it: image files, or text prompts.
    real_inputs: ClassVar[str] = IMAGES
    # Overrides `kiln tune` tries on its models beside the schemes' and precisions' knobs,
    # each a variant of its own (an override, or several that go together): the pipeline's
    # approximations, which its build gates end to end against the exact torch pipeline.
    tuning_knobs: ClassVar[tuple[str | tuple[str, ...], ...]] = ()
    # Whether its exports can merge tokens between transformer blocks ([model] token_merging).
    merges_tokens: ClassVar[bool] = False
    # Whether its UNet can merge its self-attention's tokens ([model] token_merging_ratio).
    merges_unet_tokens: ClassVar[bool] = False
    # Whether its denoiser can reuse deep features between steps ([model] deep_cache).
    caches_steps: ClassVar[bool] = False
    # Whether its transformer can skip its later blocks between steps ([model]
    # first_block_cache).
    caches_blocks: ClassVar[bool] = False
    # Ops its components contain that some converters cannot make flexible (Core ML's batch
    # and group norm): backends' profile checks read them before anything loads.
    notable_ops: ClassVar[frozenset[str]] = frozenset()
    # Files besides the components' own that its pipelines (or optimum's classes) read: a
    # bundle carries them (a trailing "/" takes the whole folder).
    bundle_configs: ClassVar[tuple[str, ...]] = ()
    # task -> the kiln command that runs an artifact of it ({bundle}: the bundle's file name).
    usage: ClassVar[Mapping[str, str]] = {}
    # Whether [[lora]] applies: diffusers pipelines fuse LoRAs with their own loaders.
    fuses_lora: ClassVar[bool] = False
    # Whether [runtime_lora] applies: its denoiser exports LoRA slots chosen at run time.
    runtime_lora: ClassVar[bool] = False
    # The schedulers [generation] may name (none: the family does not generate images).
    schedulers: ClassVar[tuple[str, ...]] = ()

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

    @classmethod
    @abstractmethod
    def pipeline_for(cls, task: str) -> str:
        """The pipeline (a key of `pipelines`) that runs a model of `task`; also how an
        artifact of manifest schema 1, which recorded no pipeline, finds its own."""

    @classmethod
    def pipeline_class(cls, name: str) -> type[Pipeline]:
        if name not in cls.pipelines:
            raise UnsupportedError(
                f"the {cls.name} family has no pipeline '{name}'"
                f"{did_you_mean(name, cls.pipelines)}; it has: {', '.join(cls.pipelines)}"
            )
        pipeline: type[Pipeline] = load_object(cls.pipelines[name])  # type: ignore[assignment]
        return pipeline

    @classmethod
    def app_notes(cls, manifest: Manifest, files: Collection[str]) -> str:
        """Markdown a bundle's README adds under "Run it" (### headings): what an app that runs
        the component files itself does around them (preprocessing, tokenizing, scheduling),
        naming the bundle's `files`. Empty: nothing beyond running them."""
        return ""

    @classmethod
    def export_spec(cls, spec: ComponentSpec, format: str) -> ComponentSpec:
        """The component as `format`'s own consumers call it (e.g. OpenVINO GenAI); by
        default as the family declares it."""
        return spec

    @classmethod
    def check_profile(cls, profile: Profile, origin: str) -> None:
        """The family's rules for a profile: its tasks, and real data of the kind it takes."""
        if profile.lora and not cls.fuses_lora:
            raise UnsupportedError(
                f"{origin}: [[lora]] does not apply to {cls.name} models; LoRAs are fused "
                "into diffusion pipelines (sd, sdxl, sd3, flux)"
            )
        if profile.runtime_lora.enabled and not cls.runtime_lora:
            raise UnsupportedError(
                f"{origin}: [runtime_lora] does not apply to {cls.name} models; run-time LoRA "
                "slots are built into SD 1.x/2.x and SDXL UNets (fuse LoRAs with [[lora]])"
            )
        model = profile.model
        # (key, its value, whether this family makes it, what it does, the family's own kind)
        approximations = (
            (
                "model.token_merging",
                model.token_merging,
                cls.merges_tokens,
                "merges the tokens of vision transformers (vit)",
                "model.token_merging_ratio" if cls.merges_unet_tokens else None,
            ),
            (
                "model.token_merging_ratio",
                model.token_merging_ratio,
                cls.merges_unet_tokens,
                "merges the tokens of SD 1.x/2.x and SDXL UNets' self-attention",
                "model.token_merging" if cls.merges_tokens else None,
            ),
            (
                "model.deep_cache",
                model.deep_cache,
                cls.caches_steps,
                "reuses the deep features of SD 1.x/2.x and SDXL UNets between denoising steps",
                "model.first_block_cache" if cls.caches_blocks else None,
            ),
            (
                "model.first_block_cache",
                model.first_block_cache,
                cls.caches_blocks,
                "skips the later blocks of SD3's and Flux's transformers between denoising steps",
                "model.deep_cache" if cls.caches_steps else None,
            ),
        )
        for key, value, made, what, instead in approximations:
            if value and not made:
                raise UnsupportedError(
                    f"{origin}: {key} does not apply to {cls.name} models; it {what}"
                    + (f"; use {instead}" if instead else "")
                )
        generation = profile.generation
        if not cls.schedulers and any(v is not None for v in asdict(generation).values()):
            raise UnsupportedError(
                f"{origin}: [generation] does not apply to {cls.name} models, which do not "
                "generate images"
            )
        if generation.scheduler is not None and generation.scheduler not in cls.schedulers:
            raise UnsupportedError(
                f"{origin}: generation.scheduler = '{generation.scheduler}' does not run "
                f"{cls.name} models{did_you_mean(generation.scheduler, cls.schedulers)}; "
                f"use one of: {', '.join(cls.schedulers)}"
            )
        task = profile.model.task
        if task != "auto" and task not in cls.tasks:
            raise UnsupportedError(
                f"{origin}: model.task = '{task}' does not apply to {cls.name} models"
                f"{did_you_mean(task, cls.tasks)}; use one of: auto, {', '.join(cls.tasks)}"
            )
        key = "data" if cls.real_inputs == IMAGES else "prompts"
        other = "prompts" if key == "data" else "data"
        for name in ("calibration", "validation"):
            if getattr(getattr(profile, name), other):
                raise ProfileError(
                    f"{origin}: {name}.{other} does not apply to {cls.name} models, which "
                    f"take {cls.real_inputs}: use {name}.{key}"
                )

    @classmethod
    def real_data_key(cls) -> str:
        """The [calibration] / [validation] key that holds its real inputs."""
        return "data" if cls.real_inputs == IMAGES else "prompts"
