"""`kiln build`: resolve the source, export every component, validate it, commit the artifact."""

from __future__ import annotations

import functools
import gc
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modelkiln import __version__, memory_budget, quality
from modelkiln.artifact import MANIFEST_NAME, record_files, write_manifest
from modelkiln.build_cache import BuildCache, UpToDate, build_key, built_key
from modelkiln.checkpoints.lora import fuse_loras
from modelkiln.env import (
    host_info,
    library_versions,
    peak_rss_bytes,
    release_memory,
    resident_bytes,
)
from modelkiln.errors import ProfileError, ValidationError
from modelkiln.evaluation.components import (
    Tolerance,
    compare_outputs,
    reference_outputs,
    save_reference,
    validation_feeds,
    verdict,
)
from modelkiln.exporters import by_block
from modelkiln.exporters.base import export_signature
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
    ValidationRecord,
)
from modelkiln.reference import pipeline_class
from modelkiln.runtimes import Runtime
from modelkiln.runtimes.torch import TorchModuleSession
from modelkiln.sources import ResolvedSource, resolve_source
from modelkiln.specs import ComponentSpec, conform

logger = logging.getLogger(__name__)


class CachedLoader(Protocol):
    """A component's torch module, loaded once on first call (functools.cache)."""

    def __call__(self) -> Any: ...

    def cache_clear(self) -> None: ...


DEFAULT_OUTPUT_ROOT = Path("artifacts")
VALIDATION_FEEDS = 4


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
    # The components as the format's own consumers call them (OpenVINO GenAI's UNet timestep).
    for spec in specs:
        component = plan.component(spec.name)
        if spec.name in blockwise:
            records[spec.name] = _build_by_block(spec, staging, runtime, plan, component, progress)
            release_memory()
            continue
        # One component's torch module in memory at a time (SD's UNet alone is 3.4 GB),
        # loaded only when needed: a streamed ONNX export never loads it.
        load_module = functools.cache(spec.module)
        recorded = feeds.pop(spec.name, ())
        export_module, quantization = _before_export(component, load_module, recorded)
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
        record = _validate(
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
        records[spec.name] = replace(record, quantization=quantization)
        release_memory()  # one component's gigabytes gone before the next one loads
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
    component: ComponentPlan, load_module: CachedLoader, calibration: Sequence[Any]
) -> tuple[CachedLoader, QuantizationRecord | None]:
    """The module the exporter gets: a before-export scheme quantizes it first (and the
    record says what it did); otherwise the source module itself."""
    handler, scheme = component.handler, component.scheme
    if handler is None or scheme is None or handler.stage is not Stage.BEFORE_EXPORT:
        return load_module, None
    module, record = quantize_module(handler, load_module(), scheme, component.name, calibration)
    return _Prepared(module), record


class _Prepared:
    """A module made before the export (a CachedLoader): released by cache_clear."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self) -> Any:
        return self.module

    def cache_clear(self) -> None:
        self.module = None


def _validate(
    spec: ComponentSpec,
    load_module: CachedLoader,
    entry: Path,
    staging: Path,
    runtime: Runtime,
    plan: BuildPlan,
    component: ComponentPlan,
    progress: Progress,
    real_feeds: Sequence[dict[str, np.ndarray]] = (),
    expected: list[dict[str, np.ndarray]] | None = None,
) -> ComponentRecord:
    """Run the exported component against its torch module on several seeded feeds (or
    against `expected`, its outputs on those feeds computed already).

    A component calibrated on real inputs is validated on (up to VALIDATION_FEEDS of) those:
    its activation ranges come from them, and random inputs far outside them would measure
    clipping that real use never sees.

    The torch module runs first and is released before the export is opened: the build then
    holds one copy of a component's weights at a time (SD-1.5's UNet: 3.4 GB, not 6.9 GB).
    """
    profile = component.profile
    options = plan.runtime_options(spec.name)
    inputs, outputs = export_signature(spec, profile)
    record = ComponentRecord(
        name=spec.name,
        entry=entry.relative_to(staging).as_posix() or ".",
        inputs=inputs,
        outputs=outputs,
    )
    settings = profile.validation
    tolerance = _tolerance(spec, profile)
    feeds = _feeds(spec, profile, real_feeds)
    label = _label(runtime, component)
    not_run = runtime.unavailable_reason(options)
    task = (
        f"validating {spec.name} ({label})"
        if not_run is None
        else f"torch reference of {spec.name} for a later `kiln validate`"
    )
    with progress.task(task, total=2 * len(feeds)) as advance:
        if expected is None:
            reference = TorchModuleSession(load_module(), f"{spec.name} (torch)", inputs, outputs)
            expected = reference_outputs(reference, feeds, advance)
            del reference
            load_module.cache_clear()
            gc.collect()
        else:
            advance(len(feeds))
        if not_run is not None:
            # Core ML off macOS: nothing here runs the program. The manifest says so, and the
            # torch outputs travel in the artifact for `kiln validate` where it runs.
            logger.info("%s: validation not run here: %s", spec.name, not_run)
            saved = save_reference(staging, spec.name, feeds, expected)
            pending = ValidationRecord(
                passed=None, tolerance=tolerance, label=label, not_run=not_run, reference=saved
            )
            return replace(record, validation=pending)
        with runtime.open(entry, spec.name, inputs, outputs, options) as candidate:
            metrics = compare_outputs(expected, candidate, feeds, advance)
            runtime_info = candidate.info
    validation = verdict(spec.name, label, metrics, tolerance)
    if real_feeds:
        validation = replace(validation, inputs=f"{len(feeds)} of the calibration feeds")
    else:
        validation = replace(validation, batch_sizes=tuple(settings.batch_sizes))
    return replace(record, validation=validation, runtime=runtime_info)


def _tolerance(spec: ComponentSpec, profile: Profile) -> Tolerance:
    settings = profile.validation
    return Tolerance(
        atol=settings.atol if settings.atol is not None else spec.atol,
        min_cosine=settings.min_cosine,
        min_top1_agreement=settings.min_top1_agreement,
        min_sqnr_db=settings.min_sqnr_db,
    )


def _label(runtime: Runtime, component: ComponentPlan) -> str:
    """What a validation ran: format, runtime, precision and scheme."""
    profile = component.profile
    label = f"{profile.export.format} on {runtime.name}, {profile.precision.compute}"
    return label if component.scheme is None else f"{label}, {component.scheme.name}"


def _feeds(
    spec: ComponentSpec, profile: Profile, real_feeds: Sequence[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """What validation runs: up to VALIDATION_FEEDS of the calibration feeds, else one seeded
    random feed per validation batch size."""
    if real_feeds:
        step = max(1, len(real_feeds) // VALIDATION_FEEDS)
        return list(real_feeds[::step][:VALIDATION_FEEDS])
    settings = profile.validation
    inputs, _ = export_signature(spec, profile)
    batches = tuple(size * spec.batch_factor for size in settings.batch_sizes)
    return validation_feeds(inputs, batches, settings.seed, spec.default_dims)


def _build_by_block(
    spec: ComponentSpec,
    staging: Path,
    runtime: Runtime,
    plan: BuildPlan,
    component: ComponentPlan,
    progress: Progress,
) -> ComponentRecord:
    """A component too large for memory: exported, compressed and checked one block at a
    time, then validated against the torch outputs the blocks computed: run whole where that
    fits the memory budget, else as the chain of its compressed blocks."""
    profile = component.profile
    feeds = _feeds(spec, profile, ())
    options = plan.runtime_options(spec.name)
    made = by_block.export(spec, component, options, staging, feeds, progress)
    budget = profile.build.max_memory_gb
    limit = memory_budget.limit_bytes(budget)
    needed = resident_bytes() + made.whole_check_bytes()
    try:
        # Without a chain of blocks (ONNX), the estimate counted the whole check.
        if needed <= limit or not made.chained:
            record = _validate(
                spec,
                _no_module,
                made.entry,
                staging,
                runtime,
                plan,
                component,
                progress,
                expected=made.expected,
            )
            # What the whole check took against what it was planned to take.
            logger.info(
                "%s checked whole: planned %.1f GB, peak resident %.1f GB",
                spec.name,
                needed / memory_budget.GB,
                peak_rss_bytes() / memory_budget.GB,
            )
        else:
            gb = memory_budget.GB
            reason = (
                f"run whole it would hold about {needed / gb:.1f} GB, over the build's "
                f"{limit / gb:.1f} GB ({memory_budget.limit_source(budget)})"
            )
            logger.info("%s: validated as its chain of blocks: %s", spec.name, reason)
            inputs, outputs = export_signature(spec, profile)
            label = f"{_label(runtime, component)}, blocks chained"
            validation = verdict(spec.name, label, made.chained, _tolerance(spec, profile))
            batches = tuple(profile.validation.batch_sizes)
            record = ComponentRecord(
                name=spec.name,
                entry=made.entry.relative_to(staging).as_posix(),
                inputs=inputs,
                outputs=outputs,
                validation=replace(validation, batch_sizes=batches, chained=reason),
                runtime=made.runtime,
            )
    except ValidationError as error:
        if not made.blocks:
            raise
        # Where the error entered: the block that moved its output most.
        name, score = min(made.blocks.items(), key=lambda item: item[1].min_cosine)
        raise ValidationError(
            f"{error} (block by block, the worst alone was {name}: cosine "
            f"{score.min_cosine:.6f} against torch)"
        ) from error
    validation = replace(record.validation, by_block=made.blocks)
    return replace(record, validation=validation, quantization=made.quantization)


class _NoModule:
    """The CachedLoader of a component whose torch reference was computed block by block."""

    def __call__(self) -> Any:
        raise AssertionError("a component built block by block is never loaded whole")

    def cache_clear(self) -> None:
        return None


_no_module = _NoModule()


def default_output(source: str, profile: Profile) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source.rstrip("/").split("/")[-1].split(":")[-1])
    return DEFAULT_OUTPUT_ROOT / f"{slug.strip('-.') or 'model'}-{profile.name}"


__all__ = ["build", "default_output"]
