"""One component against its torch reference, on the same feeds: the build's validation, and
`kiln validate` of a component the build could not run (Core ML off macOS).

The build runs every exported component with these functions and refuses an artifact that
misses the profile's tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from modelkiln.errors import ArtifactError, ValidationError
from modelkiln.evaluation.metrics import OutputMetrics, Tolerance
from modelkiln.records import OutputScore, ValidationRecord
from modelkiln.runtimes.base import Session
from modelkiln.specs import TensorSpec


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
) -> ValidationRecord:
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
    return ValidationRecord(
        passed=True,
        tolerance=tolerance,
        outputs={name: OutputScore.of(output) for name, output in metrics.items()},
        label=label,
    )


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


def check_pending(candidate: Session, record: ValidationRecord, root: Path) -> ValidationRecord:
    """Validate a component whose build could not run it, against its saved torch outputs;
    raises ValidationError on a miss, like the build would have."""
    if record.reference is None or record.tolerance is None:
        raise ArtifactError(
            f"{candidate.name} has no saved torch reference to validate against; rebuild it"
        )
    feeds, expected = load_reference(root / record.reference)
    metrics = compare_outputs(expected, candidate, feeds)
    return verdict(candidate.name, record.label, metrics, record.tolerance)
