"""Compare sessions on the same feeds: max-abs, cosine and top-1 agreement per output.

The build runs every exported component against its torch reference with these functions and
refuses an artifact that misses the profile's tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelkiln.errors import ArtifactError, ValidationError
from modelkiln.runtimes.base import Session
from modelkiln.specs import TensorSpec


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
        self.min_cosine = min(self.min_cosine, _min_cosine(reference, candidate))
        if is_logits:
            self.top1_agree += int((reference.argmax(-1) == candidate.argmax(-1)).sum())
            self.top1_total += int(reference.argmax(-1).size)

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio over every feed: 10 log10(sum ref² / sum err²)."""
        if self.sum_noise == 0.0:
            return float("inf")
        return float(10 * np.log10(max(self.sum_signal, 1e-300) / self.sum_noise))

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "max_abs": self.max_abs,
            "mean_abs": self.sum_abs / max(self.count, 1),
            "min_cosine": self.min_cosine,
            # JSON has no infinity: null means the outputs were identical.
            "sqnr_db": None if self.sqnr_db == float("inf") else round(self.sqnr_db, 2),
        }
        if self.top1_total:
            data["top1_agreement"] = self.top1_agree / self.top1_total
        if self.non_finite:
            data["non_finite"] = True
        return data

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


def _min_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The worst per-sample cosine similarity (axis 0 is the batch)."""
    ref = reference.reshape(reference.shape[0], -1) if reference.ndim else reference.reshape(1, -1)
    cand = candidate.reshape(ref.shape)
    dot = (ref * cand).sum(axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    # Two all-zero vectors are identical; one zero vector against another is not.
    cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.all(ref == cand, axis=1))
    return float(cosine.min())


def reference_outputs(
    reference: Session,
    feeds: Sequence[Mapping[str, np.ndarray]],
    on_feed: Callable[[int], None] = lambda n: None,
) -> list[dict[str, np.ndarray]]:
    """The reference's outputs for every feed, computed before the candidate is opened, so
    that the two never hold their weights in memory at the same time."""
    expected = []
    for feed in feeds:
        expected.append(reference.run(feed, list(reference.output_specs)))
        on_feed(1)
    return expected


def compare_outputs(
    expected: Sequence[Mapping[str, np.ndarray]],
    candidate: Session,
    feeds: Sequence[Mapping[str, np.ndarray]],
    on_feed: Callable[[int], None] = lambda n: None,
) -> dict[str, OutputMetrics]:
    """Run the candidate on every feed and accumulate metrics against the expected outputs."""
    metrics = {name: OutputMetrics() for name in candidate.output_specs}
    for feed, reference in zip(feeds, expected, strict=True):
        actual = candidate.run(feed, list(metrics))
        for name, spec in candidate.output_specs.items():
            try:
                metrics[name].add(reference[name], actual[name], spec.is_logits)
            except ValidationError as error:
                raise ValidationError(f"{candidate.name} output '{name}': {error}") from None
        on_feed(1)
    return metrics


def validation_feeds(
    inputs: Mapping[str, TensorSpec],
    batch_sizes: tuple[int, ...],
    seed: int,
    dims: Mapping[str, int],
) -> list[dict[str, np.ndarray]]:
    """One seeded random feed per batch size."""
    feeds = []
    for index, batch in enumerate(batch_sizes):
        rng = np.random.default_rng(seed + index)
        all_dims = {**dims, "batch": batch}
        feeds.append({name: spec.random(all_dims, rng) for name, spec in inputs.items()})
    return feeds


def verdict(
    component: str, label: str, metrics: Mapping[str, OutputMetrics], tolerance: Tolerance
) -> dict[str, Any]:
    """The manifest's validation record; raises ValidationError when any output misses."""
    for name, output in metrics.items():
        problems = output.misses(tolerance)
        if problems and output.non_finite:
            # Half precision overflows where fp32 does not (the SD VAE decoder is notorious).
            raise ValidationError(
                f"{component} ({label}) output '{name}' produced NaN or inf, an overflow of a "
                f"reduced precision; keep it in fp32 with [components.{component}] "
                f'compute = "fp32" (--set components.{component}.compute=fp32)'
            )
        if problems:
            raise ValidationError(
                f"{component} ({label}) output '{name}' missed the profile's tolerance: "
                f"{'; '.join(problems)}. Loosen [validation] (every component) or "
                f"[components.{component}] in the profile if this is expected (e.g. --set "
                f"components.{component}.atol=...), otherwise the export is wrong"
            )
    return {
        "passed": True,
        "tolerance": asdict(tolerance),
        "outputs": {name: output.summary() for name, output in metrics.items()},
    }


# Inside an artifact: the torch reference of a component nothing at build time could run.
REFERENCE_DIR = "validation"


def save_reference(
    root: Path,
    component: str,
    feeds: Sequence[Mapping[str, np.ndarray]],
    expected: Sequence[Mapping[str, np.ndarray]],
) -> str:
    """Write the validation feeds and the torch outputs for them; returns the artifact path."""
    relative = f"{REFERENCE_DIR}/{component}.npz"
    arrays = {}
    for index, (feed, outputs) in enumerate(zip(feeds, expected, strict=True)):
        arrays.update({f"{index}/input/{name}": array for name, array in feed.items()})
        arrays.update({f"{index}/output/{name}": array for name, array in outputs.items()})
    (root / REFERENCE_DIR).mkdir(exist_ok=True)
    np.savez_compressed(root / relative, **arrays)  # type: ignore[arg-type]
    return relative


def load_reference(path: Path) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """The feeds and torch outputs save_reference wrote, in order."""
    try:
        with np.load(path) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise ArtifactError(
            f"cannot read the validation reference {path} ({type(error).__name__}); run `kiln "
            "validate` on the artifact directory the build wrote (bundles leave it out)"
        ) from error
    count = 1 + max((int(key.split("/", 1)[0]) for key in arrays), default=-1)
    feeds: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    outputs: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    for key, array in arrays.items():
        index, kind, name = key.split("/", 2)
        (feeds if kind == "input" else outputs)[int(index)][name] = array
    return feeds, outputs


def check_pending(candidate: Session, record: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """Validate a component whose build could not run it, against its saved torch outputs;
    raises ValidationError on a miss, like the build would have."""
    feeds, expected = load_reference(root / record["reference"])
    metrics = compare_outputs(expected, candidate, feeds)
    return verdict(candidate.name, record["label"], metrics, Tolerance(**record["tolerance"]))
