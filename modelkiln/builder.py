"""`kiln build`: resolve the source, export every component, validate it, commit the artifact."""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln import __version__, memory_budget, quality
from modelkiln.artifact import MANIFEST_NAME, record_files, write_manifest
from modelkiln.build_cache import BuildCache, UpToDate, build_key, built_key
from modelkiln.checkpoints.lora import fuse_loras
from modelkiln.component_checks import CachedLoader, build_by_block, validate_component
from modelkiln.env import (
    host_info,
    library_versions,
    peak_rss_bytes,
    release_memory,
)
from modelkiln.errors import ProfileError
from modelkiln.exporters import by_block
from modelkiln.exporters.base import Exporter
from modelkiln.models import detect_family
from modelkiln.models.base import ModelFamily
from modelkiln.outputs import atomic_directory, check_writable
from modelkiln.plan import BuildPlan, ComponentPlan, load_plan
from modelkiln.profiles import LoraSettings, Profile
from modelkiln.progress import NullProgress, Progress
from modelkiln.quantize import Stage, quantize_exported, quantize_module
from modelkiln.records import (
    BuildRecord,
    ComponentRecord,
    EndToEndRecord,
    Manifest,
    QuantizationRecord,
)
from modelkiln.reference import pipeline_class
from modelkiln.runtimes import Runtime
from modelkiln.sources import ResolvedSource, resolve_source
from modelkiln.specs import ComponentSpec, conform

logger = logging.getLogger(__name__)


DEFAULT_OUTPUT_ROOT = Path("artifacts")


def build(
    source: str | Path,
    profile: str | Path | Profile,
    output: str | Path | None = None,
    *,
    overrides: Iterable[str] = (),
    revision: str | None = None,
    allow_pickle: bool = False,
    config: str | Path | None = None,
    loras: Sequence[LoraSettings] = (),
    progress: Progress | None = None,
    cache: BuildCache | str | Path | None = None,
    reuse: bool = False,
) -> Path:
    """Build `source` with `profile` into `output` (default artifacts/<source>-<profile>).

    The artifact appears only when every component exported and passed validation; an
    earlier artifact at `output` survives any failure. `cache` (a BuildCache, a folder or
    an fsspec URL): restore the build from it when its key is there, store it when not.
    `reuse`: keep an artifact already at `output` that was built with the same key.
    """
    started = time.perf_counter()
    progress = progress or NullProgress()
    plan = load_plan(profile, overrides)
    if loras:  # --lora: after the profile's own [[lora]], recorded in the profile as they are
        plan = load_plan(replace(plan.profile, lora=(*plan.profile.lora, *loras)))
    plan.require_calibration_data()
    exporter = plan.exporter()
    runtime = plan.runtime()
    # Fail on a missing backend or an unwritable output before minutes of loading.
    exporter.require()
    runtime.require()
    if output is not None:
        check_writable(Path(output), folder=True)

    with progress.task(f"resolving {source}"):
        resolved = resolve_source(
            source, revision=revision, allow_pickle=allow_pickle, config=config
        )
        family = detect_family(resolved)
    if family.name != plan.family.name:
        raise ProfileError(
            f"profile '{plan.profile.name}' is for {plan.family.name} models but "
            f"{source} is a {family.name} model; pick a {family.name}-* profile "
            "(`kiln profiles list`)"
        )
    target = Path(output) if output is not None else default_output(resolved.spec, plan.profile)
    stored = cache if isinstance(cache, BuildCache) or cache is None else BuildCache(cache)
    keep = built_key(target) if reuse else None
    # Claimed (locked, writable, not the user's own folder) before minutes of loading.
    try:
        with atomic_directory(target, marker=MANIFEST_NAME) as staging:
            _build_into(staging, resolved, family, plan, progress, started, stored, keep)
    except UpToDate:
        logger.info("%s is up to date (same build key)", target)
        return target
    logger.info("built %s in %.1f s", target, time.perf_counter() - started)
    return target


def _build_into(
    staging: Path,
    resolved: ResolvedSource,
    family: type[ModelFamily],
    plan: BuildPlan,
    progress: Progress,
    started: float,
    cache: BuildCache | None = None,
    existing_key: str | None = None,
) -> None:
    """Load, export, quantize and validate every component into staging, then kiln.json;
    or restore them from the build cache when the build's key is there."""
    exporter = plan.exporter()
    runtime = plan.runtime()
    if plan.profile.lora:
        with progress.task(f"fusing {len(plan.profile.lora)} LoRA(s) into {resolved.spec}"):
            resolved = fuse_loras(
                resolved, plan.profile.lora, max_memory_gb=plan.profile.build.max_memory_gb
            )
    with progress.task(f"loading {resolved.spec}"):
        loaded = family.load(resolved, plan.profile)
    names = [spec.name for spec in loaded.components]
    plan.check_components(names)
    # The manifest records what was built, so "auto" is resolved.
    plan = plan.with_task(loaded.task)
    resolved_profile = plan.profile
    key = build_key(loaded.weights, resolved_profile, resolved.loras)
    if existing_key == key:
        raise UpToDate
    if cache is not None:
        with progress.task(f"looking up {key} in the build cache {cache.location}"):
            if cache.restore(key, staging) is not None:
                return
    calibrating = plan.calibrated(names)
    not_run = runtime.unavailable_reason(plan.runtime_options())
    gated = quality.wanted(resolved_profile) and not_run is None
    found = memory_budget.estimate(loaded.components, whole_pipeline=gated or bool(calibrating))
    budget = resolved_profile.build.max_memory_gb
    specs = [family.export_spec(declared, exporter.format) for declared in loaded.components]
    blockwise, found = by_block.choose(specs, plan, found, memory_budget.limit_bytes(budget))
    if found is not None:
        memory_budget.check_fits(found, budget, f"profile '{resolved_profile.name}'")
    # Real data first, from the torch pipeline, before any export holds memory.
    feeds = (
        pipeline_class(loaded).calibration_feeds(loaded, resolved_profile, calibrating, progress)
        if calibrating
        else {}
    )
    expected = quality.reference(loaded, resolved_profile, progress) if gated else None
    records = {}
    # An outer count over the components, so a long build shows how far it is (2/4, ETA).
    with progress.task(f"building {len(specs)} component(s)", total=len(specs)) as built:
        for spec in specs:
            records[spec.name] = _build_component(
                spec, plan, exporter, runtime, staging, feeds, blockwise, progress
            )
            release_memory()  # one component's gigabytes gone before the next one loads
            built(1)
    # Last, so that the family's configs win over anything an exporter saved beside them.
    for name, content in loaded.config_files.items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_bytes(content)
    exporter.complete(staging)
    manifest = Manifest(
        family=family.name,
        pipeline=loaded.pipeline,
        task=loaded.task,
        format=exporter.format,
        runtime=runtime.name,
        source=replace(resolved.describe(), weights_sha256=loaded.weights),
        profile=resolved_profile,
        components=records,
        files=record_files(staging),
        model_info=loaded.model_info,
        versions=library_versions(),
        build=BuildRecord(
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            seconds=round(time.perf_counter() - started, 2),
            peak_rss_bytes=peak_rss_bytes(),
            host=host_info(),
            key=key,
        ),
        modelkiln_version=__version__,
        end_to_end=(
            EndToEndRecord(not_run=not_run)
            if not_run and quality.wanted(resolved_profile)
            else None
        ),
    )
    write_manifest(staging, manifest)
    if expected is not None:
        end_to_end = quality.check(staging, expected, resolved_profile, progress)
        write_manifest(staging, replace(manifest, end_to_end=end_to_end))
    if cache is not None:
        with progress.task(f"storing {key} in the build cache {cache.location}"):
            cache.store(key, staging)


def _before_export(
    component: ComponentPlan,
    exporter: Exporter,
    load_module: CachedLoader,
    calibration: Sequence[Any],
) -> tuple[CachedLoader, QuantizationRecord | None]:
    """The module the exporter gets: a before-export scheme quantizes it first, the module
    as the exporter traces it (and the record says what it did); otherwise the source module
    itself."""
    handler, scheme = component.handler, component.scheme
    if handler is None or scheme is None or handler.stage is not Stage.BEFORE_EXPORT:
        return load_module, None
    module = load_module()
    with exporter.traced_as(module, component.profile):
        quantized, record = quantize_module(handler, module, scheme, component.name, calibration)
    return _Prepared(quantized), record


class _Prepared:
    """A module made before the export (a CachedLoader): released by cache_clear."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self) -> Any:
        return self.module

    def cache_clear(self) -> None:
        self.module = None


def _build_component(
    spec: ComponentSpec,
    plan: BuildPlan,
    exporter: Exporter,
    runtime: Runtime,
    staging: Path,
    feeds: dict[str, list[dict[str, np.ndarray]]],
    blockwise: Collection[str],
    progress: Progress,
) -> ComponentRecord:
    """Export, quantize and validate one component; its record for the manifest. The
    components as the format's own consumers call them (OpenVINO GenAI's UNet timestep)."""
    component = plan.component(spec.name)
    if spec.name in blockwise:
        return build_by_block(spec, staging, runtime, plan, component, progress)
    # One component's torch module in memory at a time (SD's UNet alone is 3.4 GB),
    # loaded only when needed: a streamed ONNX export never loads it.
    load_module = functools.cache(spec.module)
    recorded = feeds.pop(spec.name, ())
    export_module, quantization = _before_export(component, exporter, load_module, recorded)
    # What the exported files take: the torch pipeline's feeds in the export's dtypes.
    real_feeds = [
        {name: conform(value, spec.inputs[name]) for name, value in feed.items()}
        for feed in recorded
    ]
    # A module changed before the export is exported as it is, not streamed from
    # the source's checkpoint.
    exported = spec if quantization is None else replace(spec, meta_module=None)
    with progress.task(f"exporting {spec.name} to {exporter.format}"):
        entry = exporter.export(exported, export_module, component.profile, staging)
    if component.handler is not None and component.handler.stage is Stage.AFTER_EXPORT:
        assert component.scheme is not None
        with progress.task(f"quantizing {spec.name} ({component.scheme.name})"):
            quantization = quantize_exported(
                component.handler, entry, component.scheme, spec.name, real_feeds
            )
    entry = exporter.finish(spec, entry, component.profile)
    if export_module is not load_module:
        # The export's module was quantized in place: the reference is loaded again.
        export_module.cache_clear()
        load_module.cache_clear()
    record = validate_component(
        spec,
        load_module,
        entry,
        staging,
        runtime,
        plan,
        component,
        progress,
        real_feeds=real_feeds,
    )
    return replace(record, quantization=quantization)


def default_output(source: str, profile: Profile) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source.rstrip("/").split("/")[-1].split(":")[-1])
    return DEFAULT_OUTPUT_ROOT / f"{slug.strip('-.') or 'model'}-{profile.name}"


__all__ = ["build", "default_output"]
