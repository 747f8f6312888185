"""What a comparison of two bench reports is: the bounds it applies, one row per metric and
entry, and the verdict with its Markdown and JUnit views (compare.py computes it)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from modelkiln.bench.calibration import Drift
from modelkiln.errors import InputError
from modelkiln.outputs import atomic_file

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
            if not 0 <= value < math.inf:  # also rejects NaN
                raise InputError(f"{name} must be a finite number >= 0, got {value}")
        if not 0 < self.alpha < 1:
            raise InputError(f"alpha must be between 0 and 1, got {self.alpha}")


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
    # What a reader calls the entry ("digits-ov · vit-openvino-fp32 · b8"); "": the key.
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.key

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

    def to_json(self) -> dict[str, Any]:
        """The row's numbers in the metric's unit (change and bound as fractions for relative
        metrics); None where there is none."""
        return {
            "key": self.key,
            "name": self.name,
            "metric": self.metric.name,
            "unit": self.metric.unit,
            "baseline": self.baseline,
            "current": self.current,
            "change": self.change,
            "bound": self.bound,
            "p_value": self.p_value,
            "status": str(self.status),
            "note": self.note,
        }

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
    # Entries missing from the current report and metrics not comparable (absent on a side,
    # non-finite) pass instead of failing the gate.
    allow_missing: bool = False
    # The host's own speed change between the reports (None: one has no calibration), and
    # whether the current timings were divided by it.
    drift: Drift | None = None
    normalised: bool = False

    @property
    def drift_note(self) -> str:
        if self.drift is None:
            return ""
        done = "timings normalised by it" if self.normalised else "--normalise divides by it"
        return f"{self.drift.describe()}; {done}"

    @property
    def different_machine(self) -> bool:
        return self.baseline_machine.fingerprint != self.current_machine.fingerprint

    @property
    def regressions(self) -> tuple[Row, ...]:
        return tuple(row for row in self.rows if row.status is Status.REGRESSED)

    @property
    def unmeasured(self) -> tuple[Row, ...]:
        """Rows that say something was not measured: missing entries, metrics one side
        lacks, non-finite values."""
        unusable = (Status.MISSING, Status.NOT_COMPARABLE)
        return tuple(row for row in self.rows if row.status in unusable)

    @property
    def failed(self) -> bool:
        return bool(self.regressions) or (bool(self.unmeasured) and not self.allow_missing)

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
            reasons = []
            if self.regressions:
                failing = {row.key for row in self.regressions}
                reasons.append(
                    f"{len(self.regressions)} regression(s) beyond the bounds in "
                    f"{len(failing)} of {len(keys)} compared entries"
                )
            if self.unmeasured and not self.allow_missing:
                missing = sum(row.status is Status.MISSING for row in self.unmeasured)
                other = len(self.unmeasured) - missing
                reasons.append(
                    f"{missing} entr{'y' if missing == 1 else 'ies'} missing from the current "
                    f"report and {other} metric(s) not comparable (--allow-missing accepts them)"
                )
            return "FAILED: " + "; ".join(reasons)
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

    def to_json(self) -> dict[str, Any]:
        """The verdict, the compared rows, and the entries found in one report only."""
        only = {
            status: [{"key": r.key, "name": r.name} for r in self.rows if r.status is status]
            for status in (Status.NEW, Status.MISSING)
        }
        return {
            "passed": not self.failed,
            "failed": self.failed,
            "verdict": self.verdict,
            "bounds": asdict(self.bounds),
            "different_machine": self.different_machine,
            "drift": None if self.drift is None else self.drift.ratio,
            "normalised": self.normalised,
            "rows": [row.to_json() for row in self.compared],
            "new": only[Status.NEW],
            "missing": only[Status.MISSING],
        }

    def to_markdown(self) -> str:
        """A summary for a CI job page or a pull-request comment."""
        icon = "❌" if self.failed else "✅"
        lines = [f"## kiln compare: {icon} {_md(self.verdict)}", ""]
        if self.different_machine:
            lines += [f"> ⚠️ {_md(self.machine_warning)}", ""]
        else:
            lines += [f"Machine: {_md(self.current_machine.describe())}", ""]
        if self.drift is not None:
            lines += [f"Host drift: {_md(self.drift_note)}", ""]
        b = self.bounds
        lines += [
            f"Bounds: latency +{b.max_latency_regression * 100:g}%, throughput "
            f"-{b.max_throughput_drop * 100:g}%, accuracy -{b.max_accuracy_drop:g}, memory "
            f"+{b.max_memory_growth * 100:g}%; significance alpha {b.alpha:g}",
            "",
        ]
        if self.regressions:
            lines += ["**Regressions:**", ""]
            lines += [f"- {_md(row.name)}: {_md(_summary(row))}" for row in self.regressions]
            lines.append("")
        attention = [r for r in self.compared if r.status is not Status.OK]
        passing = [r for r in self.compared if r.status is Status.OK]
        if attention:
            lines += [*_markdown_table(attention), ""]
        if passing:
            # Rows that pass fold away: the page shows what needs a look.
            lines += [
                f"<details><summary>{len(passing)} metric(s) within the bounds</summary>",
                "",
                *_markdown_table(passing),
                "",
                "</details>",
                "",
            ]
        for title, rows in (
            ("New (only in the current report)", [r for r in self.rows if r.status is Status.NEW]),
            (
                "Missing (only in the baseline)",
                [r for r in self.rows if r.status is Status.MISSING],
            ),
        ):
            if rows:
                lines += [f"**{title}:**", "", *(f"- {_md(row.name)}" for row in rows), ""]
        return "\n".join(lines)

    def write_junit(self, path: str | Path) -> None:
        """JUnit XML: one testcase per (key, metric), so CI lists each regression by name."""
        path = Path(path)
        suite = ET.Element(
            "testsuite",
            name="kiln compare",
            tests=str(len(self.rows)),
            failures=str(
                len(self.regressions) + (0 if self.allow_missing else len(self.unmeasured))
            ),
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
            case = ET.SubElement(suite, "testcase", classname=row.name, name=str(row.metric))
            unmeasured = row.status in (Status.MISSING, Status.NOT_COMPARABLE)
            if row.status is Status.REGRESSED or (unmeasured and not self.allow_missing):
                failure = ET.SubElement(case, "failure", message=_summary(row))
                failure.text = (
                    f"baseline {row.baseline_text}, current {row.current_text}"
                    + (f", p={row.p_text}" if row.p_value is not None else "")
                    + (f"; {row.note}" if row.note else "")
                )
            elif row.status in (Status.NOT_COMPARABLE, Status.NEW, Status.MISSING):
                ET.SubElement(case, "skipped", message=_summary(row))
        ET.indent(suite)
        with atomic_file(path) as staged:
            ET.ElementTree(suite).write(staged, encoding="utf-8", xml_declaration=True)

    def _skipped_rows(self) -> tuple[Row, ...]:
        skipped: tuple[Status, ...] = (Status.NEW,)
        if self.allow_missing:
            skipped += (Status.NOT_COMPARABLE, Status.MISSING)
        return tuple(row for row in self.rows if row.status in skipped)


def _markdown_table(rows: list[Row]) -> list[str]:
    lines = [
        "| entry | " + " | ".join(COLUMNS) + " |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        cells = [row.name, *row.cells()]
        if row.status is Status.REGRESSED:
            cells[-2] = f"**{row.status}**"
        lines.append("| " + " | ".join(_md(cell) for cell in cells) + " |")
    return lines


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
