"""Measure one artifact in this process: load, first call, latency per batch size, stages,
memory, size and accuracy. Returns the report entries (one per batch size)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.bench import references
from modelkiln.bench.metrics import Latency, measure_latency
from modelkiln.bench.settings import BenchSettings
from modelkiln.env import peak_rss_bytes
from modelkiln.errors import InputError
from modelkiln.loading import Artifact, load, open_artifact
from modelkiln.progress import NullProgress, Progress

DIFFUSION_TASKS = ("text-to-image", "inpainting")
# A fixed prompt and seed: every artifact generates the same thing, so times compare.
PROMPT = "a photograph of an astronaut riding a horse"
ACCURACY_BATCH = 16
# Diffusion stages: session name -> the stage it times (one entry per backend call).
STAGES = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "unet": "unet_step",
    "vae_encoder": "vae_encode",
    "vae_decoder": "vae_decode",
}


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
        if manifest.task in DIFFUSION_TASKS:
            timings = _diffusion_timings(pipeline, settings, path.name, progress)
            accuracy = (
                _diffusion_accuracy(pipeline, settings, reference, progress)
                if settings.prompts
                else None
            )
        else:
            timings = _image_timings(pipeline, settings, path.name, progress)
            accuracy = (
                _image_accuracy(artifact, pipeline, settings, reference, progress)
                if settings.data
                else None
            )
        info = _session_info(pipeline)
    common = {
        "artifact": str(path.resolve()),
        "name": path.name,
        "profile": str(manifest.profile.get("name", path.name)),
        "family": manifest.family,
        "task": manifest.task,
        "format": manifest.format,
        "runtime": settings.runtime or manifest.runtime,
        "inference_precision": info.get("inference_precision"),
        "source": str(manifest.source.get("hub_id") or manifest.source.get("spec", "")),
        "source_hash": references.source_hash(manifest),
        "threads": (
            settings.threads if settings.threads is not None else _int_or_none(info.get("threads"))
        ),
        "load_s": load_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "size_bytes": sum(record.size for record in manifest.files.values()),
        "accuracy": accuracy,
    }
    entries = []
    for batch, timing in timings.items():
        key = f"{common['source_hash']}/{common['profile']}/{common['runtime']}/b{batch}"
        latency = timing["latency"]
        images_per_s = timing["images"] / latency.mean
        entries.append(
            {
                "key": key,
                **common,
                "batch_size": batch,
                "first_inference_s": timing["first_s"],
                "latency": latency.to_json(),
                "throughput_per_s": images_per_s,
                "stages": {name: value.to_json() for name, value in timing["stages"].items()},
                "images_per_s": images_per_s if manifest.task in DIFFUSION_TASKS else None,
            }
        )
    return entries


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


def _image_timings(
    pipeline: Any, settings: BenchSettings, name: str, progress: Progress
) -> dict[int, dict[str, Any]]:
    from PIL import Image

    fixed = pipeline.fixed_batch
    wrong = [b for b in settings.batch_sizes if fixed is not None and b != fixed]
    if wrong:
        raise InputError(
            f"{name} was built for a fixed batch of {fixed} (profile [shapes]); bench it with "
            f"--batch-size {fixed}, or rebuild it with a dynamic batch"
        )
    # A real preprocessed image, whatever size the profile's preprocessing makes.
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    pixels = pipeline.preprocessor([Image.fromarray(noise)])
    timings = {}
    for batch in settings.batch_sizes:
        feed = {"pixel_values": np.repeat(pixels, batch, axis=0)}

        def call(feed: dict[str, np.ndarray] = feed) -> object:
            return pipeline.session.run(feed)

        with progress.task(f"{name}: batch {batch}"):
            first_s, latency = _timed(settings, call)
        timings[batch] = {"first_s": first_s, "latency": latency, "images": batch, "stages": {}}
    return timings


def _diffusion_timings(
    pipeline: Any, settings: BenchSettings, name: str, progress: Progress
) -> dict[int, dict[str, Any]]:
    from modelkiln.reference import generate_images

    timings = {}
    for batch in settings.batch_sizes:
        prompts = [PROMPT] * batch

        def call(prompts: list[str] = prompts) -> object:
            return generate_images(pipeline, prompts, seed=0, steps=settings.steps)

        description = f"{name}: batch {batch}, {settings.steps} steps per image"
        with progress.task(description), _recording(pipeline.sessions) as calls:

            def forget_warmups(calls: dict[str, list[float]] = calls) -> None:
                # Stage times pool the measured generations' backend calls only.
                for times in calls.values():
                    times.clear()

            first_s, latency = _timed(settings, call, forget_warmups)
        stages = {
            STAGES.get(session_name, session_name): Latency(tuple(times))
            for session_name, times in calls.items()
            if times
        }
        timings[batch] = {"first_s": first_s, "latency": latency, "images": batch, "stages": stages}
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


def _session_info(pipeline: Any) -> dict[str, Any]:
    """One precision for an image model; per component for a diffusion pipeline."""
    if hasattr(pipeline, "session"):
        return dict(pipeline.session.info)
    infos = {name: session.info for name, session in pipeline.sessions.items()}
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


def _image_accuracy(
    artifact: Artifact,
    pipeline: Any,
    settings: BenchSettings,
    reference: Path | None,
    progress: Progress,
) -> dict[str, Any]:
    from modelkiln.datasets import image_set
    from modelkiln.validate import OutputMetrics

    assert settings.data is not None
    images = image_set(settings.data, "--data", "test")
    names = list(pipeline.session.output_specs)
    with progress.task(f"{artifact.root.name}: {len(images)} images of {settings.data}"):
        batches = list(pipeline.batches(images.images, names, ACCURACY_BATCH))
    outputs = {name: np.concatenate([batch[name] for batch in batches]) for name in names}
    record: dict[str, Any] = {"data": settings.data, "images": len(images)}
    main = names[0]
    specs = pipeline.session.output_specs
    classifying = artifact.manifest.task == "image-classification"
    if classifying and images.class_names is not None:
        labels = images.label_indices(artifact.manifest.model_info["labels"], "--data")
        logits = outputs["logits"]
        top5 = np.argsort(-logits, axis=-1)[:, : min(5, logits.shape[-1])]
        record["top1"] = 100 * float((top5[:, 0] == labels).mean())
        record["top5"] = 100 * float((top5 == labels[:, None]).any(-1).mean())
    if reference is not None:
        expected = references.read_outputs(reference)
        metrics = OutputMetrics()
        metrics.add(expected[main], outputs[main], specs[main].is_logits)
        summary = metrics.summary()
        if "top1_agreement" in summary:
            record["reference_top1_agreement"] = 100 * summary["top1_agreement"]
        record["reference_cosine"] = _mean_cosine(expected[main], outputs[main])
    for metric in ("top1", "reference_top1_agreement", "reference_cosine"):
        if metric in record:
            score = record[metric] * (100 if metric == "reference_cosine" else 1)
            return {"metric": metric, "score": score, **record}
    raise InputError(
        f"--data {settings.data}: its images are not in class folders and there is no torch "
        "reference, so there is nothing to score against; give an ImageFolder "
        "(<root>/<class>/<image>) or drop --no-reference"
    )


def _mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = candidate.reshape(len(candidate), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean((a * b).sum(axis=1) / np.maximum(norms, 1e-30)))


def _diffusion_accuracy(
    pipeline: Any, settings: BenchSettings, reference: Path | None, progress: Progress
) -> dict[str, Any]:
    from modelkiln.image_quality import psnr, ssim
    from modelkiln.reference import generate

    if reference is None:
        raise InputError(
            "--prompts scores images against the torch fp32 pipeline's: drop --no-reference "
            "(or --prompts)"
        )
    expected = references.read_images(reference, len(settings.prompts))
    scores = []
    with progress.task(
        f"{len(settings.prompts)} prompts against torch fp32", len(settings.prompts)
    ) as step:
        for index, (prompt, theirs) in enumerate(zip(settings.prompts, expected, strict=True)):
            # The seeds the reference used: quality.reference draws seed + index, seed = 0.
            ours = generate(pipeline, prompt, seed=index, steps=settings.steps)
            scores.append((psnr(ours, theirs), ssim(ours, theirs)))
            step(1)
    values = [None if math.isinf(p) else round(p, 2) for p, _ in scores]
    finite = [value for value in values if value is not None]
    return {
        "metric": "psnr_db",
        "score": min(finite) if finite else None,
        "prompts": list(settings.prompts),
        "images": len(scores),
        "psnr_db": values,
        "ssim": [round(s, 4) for _, s in scores],
    }


__all__ = ["measure_artifact"]
