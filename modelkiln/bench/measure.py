"""Measure one artifact in this process: load, first call, latency per batch size, stages,
memory, size and accuracy. Returns the report entries (one per batch size).

What a call is, which sessions make up its stages and how accuracy is scored are the
pipeline's and modelkiln.evaluation's business: nothing here depends on the model family."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modelkiln.bench import references
from modelkiln.bench.metrics import Latency, measure_latency
from modelkiln.bench.settings import BenchSettings
from modelkiln.env import peak_rss_bytes
from modelkiln.errors import InputError
from modelkiln.evaluation.end_to_end import ImageData, PromptData, RealData, score
from modelkiln.loading import load, open_artifact
from modelkiln.models import FAMILIES
from modelkiln.models.base import PROMPTS
from modelkiln.pipelines.base import Pipeline
from modelkiln.pipelines.generation import ImageGenerator
from modelkiln.progress import NullProgress, Progress


def measure_artifact(
    path: Path,
    settings: BenchSettings,
    reference: Path | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """`reference`: the folder references.compute wrote for this artifact's source (None: no
    comparison with torch)."""
    progress = progress or NullProgress()
    artifact = open_artifact(path)
    manifest = artifact.manifest
    started = time.perf_counter()
    with progress.task(f"loading {path.name}"):
        pipeline = load(path, runtime=settings.runtime, threads=settings.threads)
    load_s = time.perf_counter() - started
    with pipeline:
        timings = _timings(pipeline, settings, path.name, progress)
        data = real_data(settings, FAMILIES.get(manifest.family).real_inputs)
        accuracy = (
            _accuracy(pipeline, data, reference, path.name, progress) if data is not None else None
        )
        info = _session_info(pipeline)
    generates = isinstance(pipeline, ImageGenerator)
    common = {
        "artifact": str(path.resolve()),
        "name": path.name,
        "profile": manifest.profile.name,
        "family": manifest.family,
        "task": manifest.task,
        "format": manifest.format,
        "runtime": settings.runtime or manifest.runtime,
        "inference_precision": info.get("inference_precision"),
        "source": manifest.source.name,
        "source_hash": references.source_hash(manifest),
        "threads": (
            settings.threads if settings.threads is not None else _int_or_none(info.get("threads"))
        ),
        "load_s": load_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "size_bytes": manifest.size_bytes,
        "accuracy": accuracy,
    }
    entries = []
    for batch, timing in timings.items():
        key = f"{common['source_hash']}/{common['profile']}/{common['runtime']}/b{batch}"
        latency = timing["latency"]
        images_per_s = batch / latency.mean
        entries.append(
            {
                "key": key,
                **common,
                "batch_size": batch,
                "first_inference_s": timing["first_s"],
                "latency": latency.to_json(),
                "throughput_per_s": images_per_s,
                "stages": {name: value.to_json() for name, value in timing["stages"].items()},
                "images_per_s": images_per_s if generates else None,
            }
        )
    return entries


def real_data(settings: BenchSettings, kind: str) -> RealData | None:
    """What accuracy is measured on for a family that takes `kind` (images or prompts)."""
    if kind == PROMPTS:
        # Prompt i draws seed i, as references.compute's reference did.
        return PromptData(settings.prompts, 0, settings.steps) if settings.prompts else None
    if settings.data is None:
        return None
    from modelkiln.datasets import image_set

    return ImageData(image_set(settings.data, "--data", "test"), settings.data)


# --- timing ---------------------------------------------------------------------------------


def _timed(
    settings: BenchSettings,
    call: Callable[[], object],
    before_runs: Callable[[], None] = lambda: None,
) -> tuple[float, Latency]:
    """The first call's time (lazy compilation, allocation), then warm-ups, then the runs."""
    started = time.perf_counter()
    call()
    first_s = time.perf_counter() - started
    for _ in range(settings.warmup):
        call()
    before_runs()
    latency = measure_latency(call, warmup=0, runs=settings.runs, duration_s=settings.duration_s)
    return first_s, latency


def _timings(
    pipeline: Pipeline, settings: BenchSettings, name: str, progress: Progress
) -> dict[int, dict[str, Any]]:
    """Per batch size: the first call, the latency of the timed calls, and the time of every
    session's calls during them, as the pipeline's stages."""
    timings = {}
    for batch in settings.batch_sizes:
        call = pipeline.bench_call(batch, settings.steps)
        description = f"{name}: batch {batch}"
        if isinstance(pipeline, ImageGenerator):
            description += f", {settings.steps} steps per image"
        with progress.task(description), _recording(pipeline.sessions) as calls:

            def forget_warmups(calls: dict[str, list[float]] = calls) -> None:
                # Stage times pool the measured calls' backend calls only.
                for times in calls.values():
                    times.clear()

            first_s, latency = _timed(settings, call, forget_warmups)
        stages = {
            pipeline.stages.get(session_name, session_name): Latency(tuple(times))
            for session_name, times in calls.items()
            if times and len(pipeline.sessions) > 1
        }
        timings[batch] = {"first_s": first_s, "latency": latency, "stages": stages}
    return timings


@contextlib.contextmanager
def _recording(sessions: dict[str, Any]) -> Iterator[dict[str, list[float]]]:
    calls: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():
        session.call_times = calls[name]
    try:
        yield calls
    finally:
        for session in sessions.values():
            session.call_times = None


def _session_info(pipeline: Pipeline) -> dict[str, Any]:
    """One precision for a one-session model; per component for several."""
    infos = {name: session.info for name, session in pipeline.sessions.items()}
    if len(infos) == 1:
        return dict(next(iter(infos.values())))
    precisions = {name: info.get("inference_precision") for name, info in infos.items()}
    threads = {info.get("threads") for info in infos.values()} - {None}
    return {
        "inference_precision": precisions if any(precisions.values()) else None,
        "threads": threads.pop() if len(threads) == 1 else None,
    }


def _int_or_none(value: Any) -> int | None:
    """A backend's thread count, None where it says "default" or nothing."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- accuracy -------------------------------------------------------------------------------


def _accuracy(
    pipeline: Pipeline, data: RealData, reference: Path | None, name: str, progress: Progress
) -> dict[str, Any]:
    """The bench report's accuracy record: scores against the images' labels and the torch
    reference, headed by the first that applies (top-1, agreement, cosine; PSNR for images)."""
    if isinstance(data, PromptData) and reference is None:
        raise InputError(
            "--prompts scores images against the torch fp32 pipeline's: drop --no-reference "
            "(or --prompts)"
        )
    with progress.task(f"{name}: accuracy"):
        actual = pipeline.evaluate(data, progress)
    expected = references.read_outputs(reference, data) if reference is not None else actual
    scores = score(expected, actual, data)
    if isinstance(data, PromptData):
        psnr = scores.psnr_json()
        finite = [value for value in psnr if value is not None]
        return {
            "metric": "psnr_db",
            "score": min(finite) if finite else None,
            "prompts": list(data.prompts),
            "images": scores.count,
            "psnr_db": psnr,
            "ssim": [round(value, 4) for value in scores.ssim],
        }
    record: dict[str, Any] = {"data": data.source, "images": scores.count}
    if scores.accuracy is not None:
        record["top1"] = 100 * scores.accuracy.top1
        record["top5"] = 100 * scores.accuracy.top5
    main = scores.main
    if reference is not None and main is not None:
        if main.top1_agreement is not None:
            record["reference_top1_agreement"] = 100 * main.top1_agreement
        record["reference_cosine"] = main.mean_cosine
    for metric in ("top1", "reference_top1_agreement", "reference_cosine"):
        if metric in record:
            value = record[metric] * (100 if metric == "reference_cosine" else 1)
            return {"metric": metric, "score": value, **record}
    raise InputError(
        f"--data {data.source}: its images are not in class folders and there is no torch "
        "reference, so there is nothing to score against; give an ImageFolder "
        "(<root>/<class>/<image>) or drop --no-reference"
    )


__all__ = ["measure_artifact", "real_data"]
