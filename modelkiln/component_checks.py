"""A built component checked against its torch module at build time: the seeded or
calibration feeds it runs, the tolerance it must meet, and the block-by-block path for a
component too large to hold whole."""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modelkiln import memory_budget
from modelkiln.env import peak_rss_bytes, resident_bytes
from modelkiln.errors import ValidationError
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
from modelkiln.plan import BuildPlan, ComponentPlan
from modelkiln.profiles import Profile
from modelkiln.progress import Progress
from modelkiln.records import ComponentRecord, ValidationRecord
from modelkiln.runtimes import Runtime
from modelkiln.runtimes.base import AUTO_COMPUTE, resolve_compute
from modelkiln.runtimes.torch import TorchModuleSession
from modelkiln.specs import ComponentSpec

logger = logging.getLogger(__name__)

VALIDATION_FEEDS = 4


class CachedLoader(Protocol):
    """A component's torch module, loaded once on first call (functools.cache)."""

    def __call__(self) -> Any: ...

    def cache_clear(self) -> None: ...


def validate_component(
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
        # Inside the step: a miss ends it as failed (✗), not done, before the error line.
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
    compute: str = profile.precision.compute
    if compute == AUTO_COMPUTE:  # what it picked on this CPU
        compute = f"auto: {resolve_compute(compute, type(runtime))}"
    label = f"{profile.export.format} on {runtime.name}, {compute}"
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


def build_by_block(
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
            record = validate_component(
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
