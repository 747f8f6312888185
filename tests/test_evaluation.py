"""Validation metrics and verdicts, on hand-made outputs."""

from __future__ import annotations

import numpy as np
import pytest

from modelkiln.errors import ValidationError
from modelkiln.evaluation.components import verdict
from modelkiln.evaluation.metrics import OutputMetrics, Tolerance

TOLERANCE = Tolerance(atol=1e-3, min_cosine=0.999, min_top1_agreement=1.0)


def metrics_for(
    reference: np.ndarray, candidate: np.ndarray, logits: bool = False
) -> OutputMetrics:
    metrics = OutputMetrics()
    metrics.add(reference, candidate, logits)
    return metrics


def test_metrics_and_a_passing_verdict() -> None:
    reference = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)
    metrics = metrics_for(reference, reference + np.float32(5e-4), logits=True)
    record = verdict("unet", "onnxruntime", {"out_sample": metrics}, TOLERANCE)
    assert record.passed is True
    summary = record.outputs["out_sample"]
    assert summary.max_abs == pytest.approx(5e-4, rel=1e-3)
    assert summary.top1_agreement == 1.0
    assert summary.min_cosine > 0.9999


def test_a_miss_names_the_measured_value_and_the_bound() -> None:
    reference = np.ones((1, 8), np.float32)
    metrics = metrics_for(reference, reference + np.float32(0.01))
    with pytest.raises(
        ValidationError,
        match=r"^unet \(openvino\) output 'out_sample' missed the profile's tolerance: "
        r"max-abs diff 0\.01 > atol 0\.001",
    ):
        verdict("unet", "openvino", {"out_sample": metrics}, TOLERANCE)


def test_half_precision_overflow_says_so_and_how_to_keep_fp32() -> None:
    reference = np.full((1, 3, 4, 4), 0.5, np.float32)
    candidate = reference.copy()
    candidate[0, 0, 0, 0] = np.inf
    metrics = metrics_for(reference, candidate)
    assert metrics.non_finite is True
    with pytest.raises(ValidationError) as error:
        verdict("vae_decoder", "openvino bf16", {"sample": metrics}, TOLERANCE)
    message = str(error.value)
    assert message == (
        "vae_decoder (openvino bf16) output 'sample' produced NaN or inf, an overflow of a "
        'reduced precision; keep it in fp32 with [components.vae_decoder] compute = "fp32" '
        "(--set components.vae_decoder.compute=fp32)"
    )


def test_a_broken_reference_is_not_blamed_on_the_export() -> None:
    reference = np.array([[np.nan, 1.0]], np.float32)
    with pytest.raises(ValidationError, match="the torch reference itself produced NaN or inf"):
        metrics_for(reference, np.zeros_like(reference))


def test_shape_mismatch() -> None:
    with pytest.raises(
        ValidationError, match=r"output shape \(1, 3\) differs from the reference \(1, 2\)"
    ):
        metrics_for(np.zeros((1, 2)), np.zeros((1, 3)))
