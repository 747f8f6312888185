"""Compare two bench reports entry by entry: the regression gate behind `kiln compare`.

Latency and throughput count as regressed only when the change passes its bound *and* the
per-run samples differ significantly (one-sided Mann-Whitney U), so one noisy CI run does not
fail a build. Accuracy and memory are single numbers per run: their bounds alone decide.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from modelkiln.bench.schema import read_report, validate_report
from modelkiln.errors import ReportError, missing_backend

# Below this many samples on either side a rank test has too little to rank.
MIN_SAMPLES = 3


class Status(StrEnum):
    OK = "ok"
    IMPROVED = "improved"
    REGRESSED = "regressed"
    # Beyond the bound, but the samples do not differ significantly: run-to-run noise.
    NOISE = "noise"
    NOT_COMPARABLE = "not comparable"
    NEW = "new"
    MISSING = "missing"


@dataclass(frozen=True)
class Bounds:
    """How much worse a metric may get before it counts as a regression.

    Latency, throughput and memory bounds are fractions (0.10 is 10 %); the accuracy bound is
    in the score's own unit (percentage points, or dB for psnr_db).
    """

    max_latency_regression: float = 0.10
    max_throughput_drop: float = 0.10
    max_accuracy_drop: float = 0.5
    max_memory_growth: float = 0.20
    alpha: float = 0.05

    def __post_init__(self) -> None:
        for name in (
            "max_latency_regression",
            "max_throughput_drop",
            "max_accuracy_drop",
            "max_memory_growth",
        ):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha}")


@dataclass(frozen=True)
class Metric:
    """What a row measures and how to read its numbers."""

    name: str
    unit: Literal["s", "/s", "bytes", "%", "dB", ""]
    higher_is_better: bool
    # Relative metrics compare (current - baseline) / baseline; others the plain difference.
    relative: bool

    def __str__(self) -> str:
        return self.name


LATENCY = Metric("latency p50", "s", higher_is_better=False, relative=True)
THROUGHPUT = Metric("throughput", "/s", higher_is_better=True, relative=True)
MEMORY = Metric("peak RSS", "bytes", higher_is_better=False, relative=True)
ENTRY = Metric("entry", "", higher_is_better=False, relative=False)


def accuracy_metric(name: str) -> Metric:
    """Scores are percent except PSNR, which is dB."""
    unit: Literal["%", "dB"] = "dB" if name == "psnr_db" else "%"
    return Metric(f"accuracy {name}", unit, higher_is_better=True, relative=False)


@dataclass(frozen=True)
class Row:
    """One metric of one entry key, or a key found in only one report (metric `entry`)."""

    key: str
    metric: Metric
    status: Status
    baseline: float | None = None
    current: float | None = None
    # Signed: current - baseline (relative metrics: divided by baseline).
    change: float | None = None
    # The largest worsening allowed, as a positive magnitude in the change's unit.
    bound: float | None = None
    p_value: float | None = None
    note: str = ""

    def value_text(self, value: float | None) -> str:
        if value is None:
            return ""
        unit = self.metric.unit
        if unit == "s":
            return f"{value * 1e3:.3f} ms"
        if unit == "/s":
            return f"{value:.1f}/s"
        if unit == "bytes":
            return f"{value / 1e6:.1f} MB"
        if unit == "dB":
            return "identical" if value == math.inf else f"{value:.2f} dB"
        if unit == "%":
            return f"{value:.2f} %"
        return f"{value:g}"

    @property
    def baseline_text(self) -> str:
        return self.value_text(self.baseline)

    @property
    def current_text(self) -> str:
        return self.value_text(self.current)

    @property
    def change_text(self) -> str:
        if self.change is None:
            return ""
        if self.metric.relative:
            return f"{self.change * 100:+.1f}%"
        return f"{self.change:+.2f} {_points(self.metric)}"

    @property
    def bound_text(self) -> str:
        if self.bound is None:
            return ""
        sign = "-" if self.metric.higher_is_better else "+"
        if self.metric.relative:
            return f"{sign}{self.bound * 100:g}%"
        return f"{sign}{self.bound:g} {_points(self.metric)}"

    @property
    def p_text(self) -> str:
        return "" if self.p_value is None else f"{self.p_value:.2g}"

    def cells(self) -> tuple[str, ...]:
        """The row as text, in COLUMNS order (the status last but one)."""
        return (
            str(self.metric),
            self.baseline_text,
            self.current_text,
            self.change_text,
            self.bound_text,
            self.p_text,
            str(self.status),
            self.note,
        )


# What every table of rows shows, in Row.cells() order.
COLUMNS = ("metric", "baseline", "current", "change", "bound", "p", "status", "note")


def _points(metric: Metric) -> str:
    return "dB" if metric.unit == "dB" else "points"


@dataclass(frozen=True)
class Machine:
    """The part of a report's machine block that says whether timings are comparable."""

    fingerprint: str
    cpu: str
    platform: str
    python: str

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> Machine:
        machine = report["machine"]
        return cls(
            fingerprint=machine["fingerprint"],
            cpu=machine["cpu"]["model"],
            platform=machine["platform"],
            python=machine["python"],
        )

    def describe(self) -> str:
        return f"{self.cpu} (fingerprint {self.fingerprint})"


@dataclass(frozen=True)
class Comparison:
    """Every row of a comparison, in baseline order, then the keys new in current."""

    baseline_machine: Machine
    current_machine: Machine
    bounds: Bounds
    rows: tuple[Row, ...]

    @property
    def different_machine(self) -> bool:
        return self.baseline_machine.fingerprint != self.current_machine.fingerprint

    @property
    def regressions(self) -> tuple[Row, ...]:
        return tuple(row for row in self.rows if row.status is Status.REGRESSED)

    @property
    def failed(self) -> bool:
        return bool(self.regressions)

    @property
    def improvements(self) -> tuple[Row, ...]:
        return tuple(row for row in self.rows if row.status is Status.IMPROVED)

    @property
    def new(self) -> tuple[str, ...]:
        return tuple(row.key for row in self.rows if row.status is Status.NEW)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(row.key for row in self.rows if row.status is Status.MISSING)

    @property
    def compared(self) -> tuple[Row, ...]:
        """The metric rows, without the new / missing keys."""
        return tuple(row for row in self.rows if row.metric is not ENTRY)

    @property
    def verdict(self) -> str:
        """One line: passed or FAILED, and how many of what."""
        keys = {row.key for row in self.compared}
        if self.failed:
            failing = {row.key for row in self.regressions}
            return (
                f"FAILED: {len(self.regressions)} regression(s) beyond the bounds in "
                f"{len(failing)} of {len(keys)} compared entries"
            )
        counts = [f"{len(keys)} entries compared"]
        for status in (Status.IMPROVED, Status.NOISE, Status.NOT_COMPARABLE):
            n = sum(row.status is status for row in self.compared)
            if n:
                counts.append(f"{n} {status}")
        return f"passed: no regression beyond the bounds ({', '.join(counts)})"

    @property
    def machine_warning(self) -> str:
        """Empty unless the reports come from different machines (compared anyway)."""
        if not self.different_machine:
            return ""
        return (
            f"measured on different machines (compared anyway): baseline "
            f"{self.baseline_machine.describe()}, current {self.current_machine.describe()}"
        )

    def to_markdown(self) -> str:
        """A summary for a CI job page or a pull-request comment."""
        icon = "❌" if self.failed else "✅"
        lines = [f"## kiln compare: {icon} {_md(self.verdict)}", ""]
        if self.different_machine:
            lines += [f"> ⚠️ {_md(self.machine_warning)}", ""]
        else:
            lines += [f"Machine: {_md(self.current_machine.describe())}", ""]
        b = self.bounds
        lines += [
            f"Bounds: latency +{b.max_latency_regression * 100:g}%, throughput "
            f"-{b.max_throughput_drop * 100:g}%, accuracy -{b.max_accuracy_drop:g}, memory "
            f"+{b.max_memory_growth * 100:g}%; significance alpha {b.alpha:g}",
            "",
        ]
        if self.regressions:
            lines += ["**Regressions:**", ""]
            lines += [f"- `{row.key}` {_md(_summary(row))}" for row in self.regressions]
            lines.append("")
        if self.compared:
            lines += [
                "| entry | " + " | ".join(COLUMNS) + " |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
            ]
            for row in self.compared:
                cells = [f"`{row.key}`", *row.cells()]
                if row.status is Status.REGRESSED:
                    cells[-2] = f"**{row.status}**"
                lines.append("| " + " | ".join(_md(cell) for cell in cells) + " |")
            lines.append("")
        for title, keys in (
            ("New (only in the current report)", self.new),
            ("Missing (only in the baseline)", self.missing),
        ):
            if keys:
                lines += [f"**{title}:**", "", *(f"- `{key}`" for key in keys), ""]
        return "\n".join(lines)

    def write_junit(self, path: str | Path) -> None:
        """JUnit XML: one testcase per (key, metric), so CI lists each regression by name."""
        path = Path(path)
        suite = ET.Element(
            "testsuite",
            name="kiln compare",
            tests=str(len(self.rows)),
            failures=str(len(self.regressions)),
            errors="0",
            skipped=str(len(self._skipped_rows())),
        )
        properties = ET.SubElement(suite, "properties")
        for side, machine in (
            ("baseline", self.baseline_machine),
            ("current", self.current_machine),
        ):
            for field in ("fingerprint", "cpu", "platform", "python"):
                ET.SubElement(
                    properties, "property", name=f"{side}.{field}", value=getattr(machine, field)
                )
        ET.SubElement(
            properties,
            "property",
            name="different_machine",
            value=str(self.different_machine).lower(),
        )
        for row in self.rows:
            case = ET.SubElement(suite, "testcase", classname=row.key, name=str(row.metric))
            if row.status is Status.REGRESSED:
                failure = ET.SubElement(case, "failure", message=_summary(row))
                failure.text = (
                    f"baseline {row.baseline_text}, current {row.current_text}"
                    + (f", p={row.p_text}" if row.p_value is not None else "")
                    + (f"; {row.note}" if row.note else "")
                )
            elif row.status in (Status.NOT_COMPARABLE, Status.NEW, Status.MISSING):
                ET.SubElement(case, "skipped", message=_summary(row))
        ET.indent(suite)
        path.parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)

    def _skipped_rows(self) -> tuple[Row, ...]:
        skipped = (Status.NOT_COMPARABLE, Status.NEW, Status.MISSING)
        return tuple(row for row in self.rows if row.status in skipped)


def _summary(row: Row) -> str:
    if row.status is Status.NEW:
        return "new: only in the current report"
    if row.status is Status.MISSING:
        return "missing: only in the baseline report"
    if row.status is Status.NOT_COMPARABLE:
        return f"not comparable: {row.note}" if row.note else "not comparable"
    return f"{row.metric} {row.change_text} beyond the bound {row.bound_text}"


def _md(text: str) -> str:
    """A Markdown table cell: a bare | would end the cell."""
    return text.replace("|", "\\|").replace("\n", " ")


# --- comparing ------------------------------------------------------------------------------


def compare_files(
    baseline: str | Path,
    current: str | Path,
    bounds: Bounds | None = None,
    *,
    allow_different_machine: bool = False,
) -> Comparison:
    """Read both report files (ReportError when unreadable or invalid) and compare them."""
    return _compare(
        read_report(baseline),
        read_report(current),
        bounds or Bounds(),
        allow_different_machine=allow_different_machine,
    )


def compare_reports(
    baseline: dict[str, Any],
    current: dict[str, Any],
    bounds: Bounds | None = None,
    *,
    allow_different_machine: bool = False,
) -> Comparison:
    """Compare two parsed reports, entries matched by `key`.

    Raises ReportError for unusable input: a report that breaks the schema, reports from
    different machines (unless allow_different_machine), or no entry key in common.
    """
    validate_report(baseline, "baseline report")
    validate_report(current, "current report")
    return _compare(
        baseline, current, bounds or Bounds(), allow_different_machine=allow_different_machine
    )


def _compare(
    baseline: dict[str, Any],
    current: dict[str, Any],
    bounds: Bounds,
    *,
    allow_different_machine: bool,
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
            rows.append(Row(key, ENTRY, Status.MISSING))
    rows += [Row(key, ENTRY, Status.NEW) for key in current_entries if key not in base_entries]
    return Comparison(base_machine, current_machine, bounds, tuple(rows))


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
    if baseline["peak_rss_bytes"] is not None and current["peak_rss_bytes"] is not None:
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
    """A metric measured once per run: the bound alone decides."""
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
