"""`kiln build`: resolve the source, export every component, validate it, commit the artifact."""

from __future__ import annotations

import functools
import gc
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from modelkiln import __version__, calibration, quality
from modelkiln.artifact import (
    ComponentRecord,
    Manifest,
    atomic_directory,
    record_files,
    write_manifest,
)
from modelkiln.env import host_info, library_versions, peak_rss_bytes
from modelkiln.errors import ProfileError
from modelkiln.exporters import EXPORTERS
from modelkiln.exporters.base import export_signature
from modelkiln.models import detect_family
from modelkiln.profiles import Profile, Task, load_profile
from modelkiln.progress import NullProgress, Progress
from modelkiln.quantize import quantize
from modelkiln.runtimes import RUNTIMES, Runtime, RuntimeOptions
from modelkiln.runtimes.torch import TorchModuleSession
from modelkiln.sources import resolve_source
from modelkiln.specs import ComponentSpec
from modelkiln.validate import (
    Tolerance,
    compare_outputs,
    reference_outputs,
    save_reference,
    validation_feeds,
    verdict,
)

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
    progress: Progress | None = None,
) -> Path:
    """Build `source` with `profile` into `output` (default artifacts/<source>-<profile>).

    The artifact appears only when every component exported and passed validation; an
    earlier artifact at `output` survives any failure.
    """
    started = time.perf_counter()
    progress = progress or NullProgress()
    resolved_profile = load_profile(profile, overrides)
    resolved_profile.require_calibration_data()
    exporter = EXPORTERS.get(resolved_profile.export.format)()
    runtime = RUNTIMES.get(resolved_profile.runtime_name)()
    # Fail on a missing backend before spending minutes loading the model.
    exporter.require()
    runtime.require()

    with progress.task(f"resolving {source}"):
        resolved = resolve_source(source, revision=revision, allow_pickle=allow_pickle)
        family = detect_family(resolved)
    if family.name != resolved_profile.family:
        raise ProfileError(
            f"profile '{resolved_profile.name}' is for {resolved_profile.family} models but "
            f"{source} is a {family.name} model; pick a {family.name}-* profile "
            "(`kiln profiles list`)"
        )
    with progress.task(f"loading {resolved.spec}"):
        loaded = family.load(resolved, resolved_profile)
    resolved_profile.check_components([spec.name for spec in loaded.components], family.name)
    # The manifest records what was built, so "auto" is resolved.
    resolved_profile = replace(
        resolved_profile, model=replace(resolved_profile.model, task=cast(Task, loaded.task))
    )
    target = Path(output) if output is not None else default_output(resolved.spec, resolved_profile)
    names = [spec.name for spec in loaded.components]
    # Real data first, from the torch pipeline, before any export holds memory.
    calibrating = calibration.components_to_calibrate(resolved_profile, names)
    feeds = (
        calibration.collect(loaded, resolved_profile, calibrating, progress) if calibrating else {}
    )
    not_run = runtime.unavailable_reason(RuntimeOptions.from_profile(resolved_profile.to_dict()))
    expected = (
        quality.reference(loaded, resolved_profile, progress)
        if quality.wanted(resolved_profile) and not_run is None
        else None
    )

    with atomic_directory(target) as staging:
        records = {}
        for spec in loaded.components:
            component_profile = resolved_profile.for_component(spec.name)
            # One component's torch module in memory at a time (SD's UNet alone is 3.4 GB),
            # loaded only when needed: a streamed ONNX export never loads it.
            load_module = functools.cache(spec.module)
            with progress.task(f"exporting {spec.name} to {exporter.format}"):
                entry = exporter.export(spec, load_module, component_profile, staging)
            quantization: dict[str, Any] = {}
            scheme = component_profile.quantization.scheme
            if scheme != "none":
                with progress.task(f"quantizing {spec.name} ({scheme})"):
                    settings = component_profile.quantization
                    quantization = quantize(
                        entry, exporter.format, settings, spec.name, feeds.get(spec.name, ())
                    )
            entry = exporter.finish(spec, entry, component_profile)
            record = _validate(
                spec,
                load_module,
                entry,
                staging,
                runtime,
                component_profile,
                progress,
                real_feeds=feeds.pop(spec.name, ()),
            )
            records[spec.name] = replace(record, quantization=quantization)
        # Last, so that the family's configs win over anything an exporter saved beside them.
        for name, content in loaded.config_files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(content)
        manifest = Manifest(
            family=family.name,
            task=loaded.task,
            format=exporter.format,
            runtime=runtime.name,
            source={**resolved.describe(), "weights_sha256": loaded.weights},
            profile=resolved_profile.to_dict(),
            components=records,
            files=record_files(staging),
            model_info=loaded.model_info,
            versions=library_versions(),
            build={
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": round(time.perf_counter() - started, 2),
                "peak_rss_bytes": peak_rss_bytes(),
                "host": host_info(),
            },
            modelkiln_version=__version__,
            end_to_end={"not_run": not_run} if not_run and quality.wanted(resolved_profile) else {},
        )
        write_manifest(staging, manifest)
        if expected is not None:
            end_to_end = quality.check(staging, expected, resolved_profile, progress)
            write_manifest(staging, replace(manifest, end_to_end=end_to_end))
    logger.info("built %s in %.1f s", target, time.perf_counter() - started)
    return target


def _validate(
    spec: ComponentSpec,
    load_module: CachedLoader,
    entry: Path,
    staging: Path,
    runtime: Runtime,
    profile: Profile,
    progress: Progress,
    real_feeds: Sequence[dict[str, np.ndarray]] = (),
) -> ComponentRecord:
    """Run the exported component against its torch module on several seeded feeds.

    A component calibrated on real inputs is validated on (up to VALIDATION_FEEDS of) those:
    its activation ranges come from them, and random inputs far outside them would measure
    clipping that real use never sees.

    The torch module runs first and is released before the export is opened: the build then
    holds one copy of a component's weights at a time (SD-1.5's UNet: 3.4 GB, not 6.9 GB).
    """
    options = RuntimeOptions.from_profile(profile.to_dict())
    inputs, outputs = export_signature(spec, profile)
    record = ComponentRecord(
        name=spec.name,
        entry=entry.relative_to(staging).as_posix() or ".",
        inputs=inputs,
        outputs=outputs,
        validation={},
    )
    settings = profile.validation
    tolerance = Tolerance(
        atol=settings.atol if settings.atol is not None else spec.atol,
        min_cosine=settings.min_cosine,
        min_top1_agreement=settings.min_top1_agreement,
        min_sqnr_db=settings.min_sqnr_db,
    )
    batches = tuple(size * spec.batch_factor for size in settings.batch_sizes)
    if real_feeds:
        step = max(1, len(real_feeds) // VALIDATION_FEEDS)
        feeds = list(real_feeds[::step][:VALIDATION_FEEDS])
    else:
        feeds = validation_feeds(inputs, batches, settings.seed, spec.default_dims)
    label = f"{profile.export.format} on {runtime.name}, {profile.precision.compute}"
    if profile.quantization.scheme != "none":
        label += f", {profile.quantization.scheme}"
    not_run = runtime.unavailable_reason(options)
    task = (
        f"validating {spec.name} ({label})"
        if not_run is None
        else f"torch reference of {spec.name} for a later `kiln validate`"
    )
    with progress.task(task, total=2 * len(feeds)) as advance:
        reference = TorchModuleSession(load_module(), f"{spec.name} (torch)", inputs, outputs)
        expected = reference_outputs(reference, feeds, advance)
        del reference
        load_module.cache_clear()
        gc.collect()
        if not_run is not None:
            # Core ML off macOS: nothing here runs the program. The manifest says so, and the
            # torch outputs travel in the artifact for `kiln validate` where it runs.
            logger.info("%s: validation not run here: %s", spec.name, not_run)
            saved = save_reference(staging, spec.name, feeds, expected)
            pending = {"passed": None, "not_run": not_run, "label": label, "reference": saved}
            return replace(record, validation={**pending, "tolerance": asdict(tolerance)})
        with runtime.open(entry, spec.name, inputs, outputs, options) as candidate:
            metrics = compare_outputs(expected, candidate, feeds, advance)
            runtime_info = candidate.info
    validation = verdict(spec.name, label, metrics, tolerance)
    if real_feeds:
        validation["inputs"] = f"{len(feeds)} of the calibration feeds"
    else:
        validation["batch_sizes"] = list(settings.batch_sizes)
    return replace(record, validation=validation, runtime=runtime_info)


def default_output(source: str, profile: Profile) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source.rstrip("/").split("/")[-1].split(":")[-1])
    return DEFAULT_OUTPUT_ROOT / f"{slug.strip('-.') or 'model'}-{profile.name}"


__all__ = ["build", "default_output"]
