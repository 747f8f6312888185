"""Compare two bench reports entry by entry: the regression gate behind `kiln compare`.

Latency and throughput count as regressed only when the change passes its bound *and* the
per-run samples differ significantly (one-sided Mann-Whitney U), so one noisy CI run does not
fail a build. Accuracy and memory are single numbers per run: their bounds alone decide.
An entry the current report lacks, a metric one side lacks and a non-finite value fail the
gate unless the caller allows them (`allow_missing`): what was not measured did not pass.
Reports measured at different times on a shared host differ by the host's drift: the paired
gate (bench/paired.py) measures both sides in one run instead.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from modelkiln.bench.calibration import drift_between, normalised
from modelkiln.bench.comparison import (
    ENTRY,
    LATENCY,
    MEMORY,
    MIN_SAMPLES,
    THROUGHPUT,
    Bounds,
    Comparison,
    Machine,
    Metric,
    Row,
    Status,
    accuracy_metric,
)
from modelkiln.bench.schema import read_report, validate_report
from modelkiln.errors import ReportError, missing_backend

__all__ = [
    "LATENCY",
    "MEMORY",
    "THROUGHPUT",
    "Bounds",
    "Comparison",
    "Row",
    "Status",
    "can_decide",
    "compare_entries",
    "compare_files",
    "compare_reports",
    "latency_p_value",
]


def compare_files(
    baseline: str | Path,
    current: str | Path,
    bounds: Bounds | None = None,
    *,
    allow_different_machine: bool = False,
    allow_missing: bool = False,
    normalise: bool = False,
) -> Comparison:
    """Read both report files (ReportError when unreadable or invalid) and compare them."""
    return _compare(
        read_report(baseline),
        read_report(current),
        bounds or Bounds(),
        allow_different_machine=allow_different_machine,
        allow_missing=allow_missing,
        normalise=normalise,
    )


def compare_reports(
    baseline: dict[str, Any],
    current: dict[str, Any],
    bounds: Bounds | None = None,
    *,
    allow_different_machine: bool = False,
    allow_missing: bool = False,
    normalise: bool = False,
) -> Comparison:
    """Compare two parsed reports, entries matched by `key`. `normalise`: divide the current
    report's timings by the host's drift between the two (their calibration workloads).

    Raises ReportError for unusable input: a report that breaks the schema, reports from
    different machines (unless allow_different_machine), or no entry key in common.
    """
    validate_report(baseline, "baseline report")
    validate_report(current, "current report")
    return _compare(
        baseline,
        current,
        bounds or Bounds(),
        allow_different_machine=allow_different_machine,
        allow_missing=allow_missing,
        normalise=normalise,
    )


def _compare(
    baseline: dict[str, Any],
    current: dict[str, Any],
    bounds: Bounds,
    *,
    allow_different_machine: bool,
    allow_missing: bool,
    normalise: bool,
) -> Comparison:
    base_machine = Machine.from_report(baseline)
    current_machine = Machine.from_report(current)
    if base_machine.fingerprint != current_machine.fingerprint and not allow_different_machine:
        raise ReportError(
            f"the reports come from different machines: baseline {base_machine.describe()}, "
            f"current {current_machine.describe()}; timings from different machines are not "
            "comparable: re-run both on one machine, or pass --allow-different-machine to "
            "compare anyway"
        )
    drift = drift_between(baseline, current)
    if normalise and drift is None:
        raise ReportError(
            "--normalise needs both reports' calibration workload (reports of kiln bench from "
            "before it was recorded have none): bench both again, or drop --normalise"
        )
    if normalise and drift is not None:
        current = normalised(current, drift.ratio)
    base_entries = _entries_by_key(baseline, "baseline")
    current_entries = _entries_by_key(current, "current")
    common = [key for key in base_entries if key in current_entries]
    if not common:
        raise ReportError(
            f"the reports have no entry in common: baseline has {_some(base_entries)}, "
            f"current has {_some(current_entries)}; entries match on key "
            "(source_hash/profile/runtime/bBATCH)"
        )
    rows: list[Row] = []
    for key, entry in base_entries.items():
        if key in current_entries:
            rows += compare_entries(entry, current_entries[key], bounds)
        else:
            rows.append(Row(key, ENTRY, Status.MISSING, label=entry_label(entry)))
    rows += [
        Row(key, ENTRY, Status.NEW, label=entry_label(entry))
        for key, entry in current_entries.items()
        if key not in base_entries
    ]
    return Comparison(
        base_machine,
        current_machine,
        bounds,
        tuple(rows),
        allow_missing=allow_missing,
        drift=drift,
        normalised=normalise,
    )


def entry_label(entry: dict[str, Any]) -> str:
    """What a reader calls an entry: its artifact, profile and batch (the key is hashes)."""
    return f"{entry['name']} · {entry['profile']} · b{entry['batch_size']}"


def _entries_by_key(report: dict[str, Any], side: str) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for entry in report["entries"]:
        if entry["key"] in entries:
            raise ReportError(
                f"the {side} report has two entries with key {entry['key']}: keys must be unique"
            )
        entries[entry["key"]] = entry
    return entries


def _some(entries: dict[str, Any]) -> str:
    if not entries:
        return "no entries"
    keys = list(entries)
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(keys[:3]) + more


def compare_entries(baseline: dict[str, Any], current: dict[str, Any], bounds: Bounds) -> list[Row]:
    """The rows of two entries with the same key: latency, throughput, accuracy, memory."""
    key = baseline["key"]
    rows = _entry_rows(key, baseline, current, bounds)
    return [replace(row, label=entry_label(current)) for row in rows]


def _entry_rows(
    key: str, baseline: dict[str, Any], current: dict[str, Any], bounds: Bounds
) -> list[Row]:
    samples = (baseline["latency"]["samples"], current["latency"]["samples"])
    rows = [
        _timing_row(
            key,
            LATENCY,
            baseline["latency"]["p50_s"],
            current["latency"]["p50_s"],
            bounds.max_latency_regression,
            samples,
            bounds.alpha,
        ),
        # Throughput is batch / mean latency: the same samples decide whether it moved.
        _timing_row(
            key,
            THROUGHPUT,
            baseline["throughput_per_s"],
            current["throughput_per_s"],
            bounds.max_throughput_drop,
            samples,
            bounds.alpha,
        ),
    ]
    accuracy = _accuracy_row(key, baseline["accuracy"], current["accuracy"], bounds)
    if accuracy is not None:
        rows.append(accuracy)
    if baseline["peak_rss_bytes"] is None and current["peak_rss_bytes"] is not None:
        rows.append(Row(key, MEMORY, Status.NOT_COMPARABLE, note="no peak RSS in the baseline"))
    elif baseline["peak_rss_bytes"] is not None and current["peak_rss_bytes"] is None:
        rows.append(Row(key, MEMORY, Status.NOT_COMPARABLE, note="no peak RSS in the current"))
    elif baseline["peak_rss_bytes"] is not None and current["peak_rss_bytes"] is not None:
        rows.append(
            _bounded_row(
                key,
                MEMORY,
                float(baseline["peak_rss_bytes"]),
                float(current["peak_rss_bytes"]),
                bounds.max_memory_growth,
            )
        )
    return rows


def _change(metric: Metric, baseline: float, current: float) -> float | None:
    if metric.relative:
        return None if baseline == 0 else (current - baseline) / baseline
    if baseline == current:  # also inf == inf (two identical-image PSNRs)
        return 0.0
    return current - baseline


def _worsening(metric: Metric, change: float) -> float:
    return -change if metric.higher_is_better else change


def _bounded_row(key: str, metric: Metric, baseline: float, current: float, bound: float) -> Row:
    """A metric measured once per run: the bound alone decides. NaN, or an infinite timing
    or memory, is not a measurement: not comparable (which fails unless allowed)."""
    broken = [
        side
        for side, value in (("baseline", baseline), ("current", current))
        if math.isnan(value) or (metric.relative and math.isinf(value))
    ]
    if broken:
        note = f"non-finite value in the {' and '.join(broken)} report"
        return Row(key, metric, Status.NOT_COMPARABLE, baseline, current, note=note)
    change = _change(metric, baseline, current)
    if change is None:
        return Row(key, metric, Status.NOT_COMPARABLE, baseline, current, note="baseline is 0")
    worse = _worsening(metric, change)
    status = Status.REGRESSED if worse > bound else Status.IMPROVED if worse < -bound else Status.OK
    return Row(key, metric, status, baseline, current, change, bound)


def _timing_row(
    key: str,
    metric: Metric,
    baseline: float,
    current: float,
    bound: float,
    samples: tuple[list[float], list[float]],
    alpha: float,
) -> Row:
    """A timing: beyond the bound counts only if the latency samples differ significantly."""
    row = _bounded_row(key, metric, baseline, current, bound)
    if row.change is None:
        return row
    base_samples, current_samples = samples
    if not can_decide(len(base_samples), len(current_samples), alpha):
        if row.status is Status.OK:
            return row
        note = (
            f"{len(base_samples)} vs {len(current_samples)} samples: too few for a "
            f"significance test at alpha {alpha:g}, the bound alone decides"
        )
        return replace(row, note=note)
    # Worse timing means slower runs: test whether current latencies are greater (or less).
    slower = _worsening(metric, row.change) >= 0
    p_value = latency_p_value(current_samples, base_samples, "greater" if slower else "less")
    status = row.status
    if status is not Status.OK and p_value >= alpha:
        status = Status.NOISE
    note = (
        f"beyond the bound but not significant (p >= {alpha:g})" if status is Status.NOISE else ""
    )
    return replace(row, status=status, p_value=p_value, note=note)


def can_decide(n_baseline: int, n_current: int, alpha: float) -> bool:
    """Whether a one-sided rank test on these sample counts can reach p < alpha at all.

    The smallest exact Mann-Whitney p-value is 1 / C(n + m, n): 3 vs 3 runs cannot go below
    0.05, so there the bound alone has to decide.
    """
    if min(n_baseline, n_current) < MIN_SAMPLES:
        return False
    return 1 / math.comb(n_baseline + n_current, n_baseline) < alpha


def latency_p_value(
    current: list[float], baseline: list[float], alternative: Literal["greater", "less"]
) -> float:
    """One-sided Mann-Whitney U p-value that current latencies are greater (or less)."""
    try:
        from scipy.stats import mannwhitneyu
    except ImportError as error:
        raise missing_backend("scipy", "bench") from error
    p_value = float(mannwhitneyu(current, baseline, alternative=alternative).pvalue)
    # All samples equal on both sides: no evidence of any shift.
    return 1.0 if math.isnan(p_value) else p_value


def _accuracy_row(
    key: str, baseline: dict[str, Any] | None, current: dict[str, Any] | None, bounds: Bounds
) -> Row | None:
    if baseline is None and current is None:
        return None
    if baseline is None or current is None:
        which = "baseline" if baseline is None else "current"
        return Row(
            key,
            accuracy_metric((baseline or current or {})["metric"]),
            Status.NOT_COMPARABLE,
            note=f"no accuracy in the {which} report",
        )
    if baseline["metric"] != current["metric"]:
        return Row(
            key,
            Metric("accuracy", "", higher_is_better=True, relative=False),
            Status.NOT_COMPARABLE,
            note=f"baseline measured {baseline['metric']}, current {current['metric']}",
        )
    return _bounded_row(
        key,
        accuracy_metric(baseline["metric"]),
        _score(baseline["score"]),
        _score(current["score"]),
        bounds.max_accuracy_drop,
    )


def _score(score: float | None) -> float:
    # A null score is a PSNR of identical images: infinitely good.
    return math.inf if score is None else float(score)
