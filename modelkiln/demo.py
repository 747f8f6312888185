"""`kiln demo`: the digits ViT built for every CPU backend and measured on held-out digits.

Trains (or reuses) the digits ViT, builds it with the bundled profiles, classifies the
held-out digits from PNG files with each artifact, and reports top-1 accuracy, agreement with
PyTorch and median batch-1 latency. Every backend must match PyTorch's accuracy within
`MAX_ACCURACY_GAP` points, or the demo fails.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelkiln import digits
from modelkiln.bench.metrics import measure_latency
from modelkiln.builder import build
from modelkiln.errors import ValidationError
from modelkiln.loading import load
from modelkiln.plan import load_plan
from modelkiln.progress import NullProgress, Progress

REFERENCE_PROFILE = "vit-torch-fp32"
PROFILES = (REFERENCE_PROFILE, "vit-onnxruntime-fp32", "vit-openvino-fp32", "vit-openvino-bf16")
MAX_ACCURACY_GAP = 0.5  # percentage points, floating-point profiles
# Quantized profiles may lose a little more, by the bits of their weights: int8 one point,
# 4-bit three.
BITS_ACCURACY_GAP = {8: 1.0, 4: 3.0}


def accuracy_gap(profile: str) -> float:
    """The allowed top-1 distance to PyTorch for a profile, by its quantization scheme."""
    bits = [config.weight_bits for config in load_plan(profile).schemes.values()]
    return max((BITS_ACCURACY_GAP[b] for b in bits), default=MAX_ACCURACY_GAP)


def digits_overrides(profile: str) -> list[str]:
    """What a bundled profile needs for the digits ViT: calibration images, and 4-bit groups
    that divide its hidden size (64) and MLP width (128)."""
    extra = []
    for config in load_plan(profile).schemes.values():
        if config.calibrated:
            extra.append('calibration.data="digits"')
        group_size = getattr(config, "group_size", None)
        if group_size is not None:
            extra.append(f"quantization.group_size={min(group_size, 32)}")
    return extra


@dataclass(frozen=True)
class DemoRow:
    profile: str
    backend: str  # runtime and the precision it actually used
    accuracy: float  # percent
    agreement: float  # percent of predictions equal to PyTorch's
    median_ms: float  # batch 1
    p90_ms: float
    size_mb: float


@dataclass(frozen=True)
class DemoResult:
    rows: list[DemoRow]
    model_dir: Path
    test_images: int
    threads: int | None

    @property
    def reference(self) -> DemoRow:
        return self.rows[0]


def run_demo(
    work_dir: Path,
    *,
    profiles: tuple[str, ...] = PROFILES,
    runs: int = 100,
    threads: int | None = None,
    progress: Progress | None = None,
) -> DemoResult:
    progress = progress or NullProgress()
    model_dir = digits.trained_model(progress=progress)
    split = digits.load_split()
    image_paths = digits.write_image_folder(
        work_dir / "digits-test", split.test_images, split.test_labels
    )
    rows: list[DemoRow] = []
    reference_predictions: np.ndarray | None = None
    for profile in profiles:
        artifact = build(
            model_dir,
            profile,
            work_dir / profile,
            overrides=digits_overrides(profile),
            progress=progress,
        )
        with (
            progress.task(f"classifying {len(image_paths)} digits with {profile}"),
            load(artifact, threads=threads) as pipeline,
        ):
            predictions = pipeline.logits(image_paths, batch_size=32).argmax(axis=1)
            one = pipeline.preprocessor(digits.to_pil(split.test_images[:1]))
            latency = measure_latency(
                functools.partial(pipeline.session.run, {"pixel_values": one}),
                warmup=10,
                runs=runs,
            )
            info = pipeline.session.info
        if reference_predictions is None:
            reference_predictions = predictions
        rows.append(
            DemoRow(
                profile=profile,
                backend=f"{info['runtime']} ({info['inference_precision']})",
                accuracy=100 * float((predictions == split.test_labels).mean()),
                agreement=100 * float((predictions == reference_predictions).mean()),
                median_ms=latency.p50 * 1e3,
                p90_ms=latency.p90 * 1e3,
                size_mb=_size_mb(artifact),
            )
        )
    result = DemoResult(rows, model_dir, len(image_paths), threads)
    check_accuracy(result)
    return result


def check_accuracy(result: DemoResult) -> None:
    reference = result.reference
    for row in result.rows[1:]:
        gap = abs(row.accuracy - reference.accuracy)
        allowed = accuracy_gap(row.profile)
        if gap > allowed:
            raise ValidationError(
                f"{row.profile}: top-1 accuracy {row.accuracy:.2f}% is {gap:.2f} points from "
                f"PyTorch's {reference.accuracy:.2f}% (allowed: {allowed})"
            )


def _size_mb(artifact: Path) -> float:
    return sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file()) / 1e6
