"""What one output scores against its reference: max-abs, mean-abs, cosine, SQNR and top-1
agreement, accumulated over feeds or batches; and the tolerance that gates them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelkiln.errors import ValidationError


@dataclass(frozen=True)
class Tolerance:
    atol: float
    min_cosine: float
    min_top1_agreement: float
    min_sqnr_db: float | None = None  # None: not gated


@dataclass
class OutputMetrics:
    """Accumulated over every validation feed of one output."""

    max_abs: float = 0.0
    sum_abs: float = 0.0
    sum_signal: float = 0.0  # sum of squared reference values, for the SQNR
    sum_noise: float = 0.0  # sum of squared differences
    count: int = 0
    min_cosine: float = 1.0
    sum_cosine: float = 0.0  # per sample (axis 0), for the mean
    samples: int = 0
    top1_agree: int = 0
    top1_total: int = 0
    non_finite: bool = False

    def add(self, reference: np.ndarray, candidate: np.ndarray, is_logits: bool) -> None:
        reference = reference.astype(np.float64)
        candidate = candidate.astype(np.float64)
        if reference.shape != candidate.shape:
            raise ValidationError(
                f"output shape {candidate.shape} differs from the reference {reference.shape}"
            )
        if not np.isfinite(reference).all():
            raise ValidationError(
                "the torch reference itself produced NaN or inf on random inputs: check the "
                "source model's weights"
            )
        if not np.isfinite(candidate).all():
            self.non_finite = True
            return
        diff = np.abs(reference - candidate)
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        self.sum_abs += float(diff.sum())
        self.sum_signal += float((reference**2).sum())
        self.sum_noise += float((diff**2).sum())
        self.count += diff.size
        cosines = _cosines(reference, candidate)
        self.min_cosine = min(self.min_cosine, float(cosines.min()))
        self.sum_cosine += float(cosines.sum())
        self.samples += cosines.size
        if is_logits:
            self.top1_agree += int((reference.argmax(-1) == candidate.argmax(-1)).sum())
            self.top1_total += int(reference.argmax(-1).size)

    @property
    def mean_cosine(self) -> float:
        return self.sum_cosine / self.samples if self.samples else 1.0

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_agree / self.top1_total if self.top1_total else None

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio over every feed: 10 log10(sum ref² / sum err²)."""
        if self.sum_noise == 0.0:
            return float("inf")
        return float(10 * np.log10(max(self.sum_signal, 1e-300) / self.sum_noise))

    def misses(self, tolerance: Tolerance) -> list[str]:
        if self.non_finite:
            return ["it produced NaN or inf"]
        problems = []
        if self.max_abs > tolerance.atol:
            problems.append(f"max-abs diff {self.max_abs:.3g} > atol {tolerance.atol:.3g}")
        if self.min_cosine < tolerance.min_cosine:
            problems.append(f"cosine {self.min_cosine:.6f} < {tolerance.min_cosine}")
        if tolerance.min_sqnr_db is not None and self.sqnr_db < tolerance.min_sqnr_db:
            problems.append(f"SQNR {self.sqnr_db:.1f} dB < {tolerance.min_sqnr_db} dB")
        if self.top1_total and self.top1_agree / self.top1_total < tolerance.min_top1_agreement:
            agreement = self.top1_agree / self.top1_total
            problems.append(f"top-1 agreement {agreement:.3f} < {tolerance.min_top1_agreement}")
        return problems


def _cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """The cosine similarity of every sample (axis 0 is the batch)."""
    ref = reference.reshape(reference.shape[0], -1) if reference.ndim else reference.reshape(1, -1)
    cand = candidate.reshape(ref.shape)
    dot = (ref * cand).sum(axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    # Two all-zero vectors are identical; one zero vector against another is not.
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.all(ref == cand, axis=1))
