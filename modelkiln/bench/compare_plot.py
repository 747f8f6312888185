"""kiln compare's picture: the entries that moved beyond their bounds (regressed or improved),
one panel per metric, each entry's baseline and current value joined by an arrow.

Rows within the bounds, noise, new and missing entries are left out: the picture shows what
changed. A comparison where nothing moved still gets a picture that says so, so a CI job that
keeps the file always finds one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from modelkiln.bench.comparison import Comparison, Metric, Row, Status
from modelkiln.bench.figures import FONT, WIDTH, log_if_wide, new_figure, plain, png_bytes
from modelkiln.bench.formatting import time_scale
from modelkiln.errors import InputError
from modelkiln.outputs import write_file_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MOVED = (Status.REGRESSED, Status.IMPROVED)
COLOURS = {Status.REGRESSED: "#d62728", Status.IMPROVED: "#2ca02c"}
BASELINE_COLOUR = "0.55"
# Beyond this many rows the figure shows the regressions first, then the largest changes.
MAX_ROWS = 30


def moved_rows(comparison: Comparison) -> list[Row]:
    """The rows that regressed or improved: regressions first, then the largest changes."""
    rows = [row for row in comparison.compared if row.status in MOVED]
    return sorted(rows, key=lambda row: (row.status is not Status.REGRESSED, -_size(row)))


def _size(row: Row) -> float:
    return 0.0 if row.change is None else abs(row.change)


def comparison_figure(comparison: Comparison) -> Figure:
    """One panel per metric that moved (at most MAX_ROWS rows in all), or a figure saying that
    nothing moved."""
    rows = moved_rows(comparison)
    shown = rows[:MAX_ROWS]
    # Panels in the comparison's own metric order, whatever moved most.
    panels: dict[str, list[Row]] = {row.metric.name: [] for row in comparison.compared}
    for row in shown:
        panels.setdefault(row.metric.name, []).append(row)
    panels = {name: panel for name, panel in panels.items() if panel}
    if not panels:
        figure = new_figure(2.4)
        figure.suptitle(plain(f"kiln compare: no entry moved\n{_machines(comparison)}"))
        axes = figure.add_subplot()
        axes.set_axis_off()
        axes.text(0.5, 0.5, plain(comparison.verdict), ha="center", va="center", wrap=True)
        return figure
    heights = [1.0 + 0.4 * len(panel) for panel in panels.values()]
    figure = new_figure(1.3 + sum(heights), width=WIDTH + 2)
    regressed = sum(row.status is Status.REGRESSED for row in rows)
    headline = (
        f"kiln compare: {len(rows)} metric(s) moved beyond the bounds "
        f"({regressed} regressed, {len(rows) - regressed} improved)"
    )
    if len(shown) < len(rows):
        headline += f"; the {len(shown)} largest shown"
    figure.suptitle(plain(f"{headline}\n{_machines(comparison)}"))
    grid = figure.subplots(len(panels), 1, squeeze=False, height_ratios=heights)
    for axes, panel in zip(grid[:, 0], panels.values(), strict=True):
        _panel(axes, panel)
    _legend(figure, [status for status in COLOURS if any(row.status is status for row in shown)])
    return figure


def _machines(comparison: Comparison) -> str:
    if comparison.different_machine:
        return (
            f"baseline on {comparison.baseline_machine.cpu}, "
            f"current on {comparison.current_machine.cpu}"
        )
    return f"measured on {comparison.current_machine.cpu}"


def _panel(axes: Axes, rows: Sequence[Row]) -> None:
    """Baseline (grey) to current (the status' colour), one row per entry; the change and
    status on the right, beside the axes, where they cannot cover a point."""
    metric = rows[0].metric
    values = [value for row in rows for value in (row.baseline, row.current)]
    finite = [value for value in values if value is not None and math.isfinite(value)]
    scale, unit = _unit(metric, finite)
    for index, row in enumerate(rows):
        colour = COLOURS[row.status]
        before, after = _scaled(row.baseline, scale), _scaled(row.current, scale)
        if before is not None:
            axes.scatter([before], [index], s=36, color=BASELINE_COLOUR, zorder=3)
        if after is not None:
            axes.scatter([after], [index], s=36, color=colour, zorder=3)
        if before is not None and after is not None:
            arrow = {"arrowstyle": "->", "color": colour, "lw": 1.5, "shrinkA": 4, "shrinkB": 4}
            axes.annotate("", xy=(after, index), xytext=(before, index), arrowprops=arrow)
    axes.set_yticks(range(len(rows)), [plain(row.name) for row in rows], fontsize=FONT)
    axes.set_ylim(len(rows) - 0.5, -0.5)
    side = axes.twinx()
    side.set_ylim(axes.get_ylim())
    changes = [plain(f"{row.change_text} {row.status}") for row in rows]
    side.set_yticks(range(len(rows)), changes, fontsize=FONT)
    side.tick_params(right=False)
    for label, row in zip(side.get_yticklabels(), rows, strict=True):
        label.set_color(COLOURS[row.status])
    _limits(axes, metric, [value * scale for value in finite])
    better = "higher" if metric.higher_is_better else "lower"
    axes.set_title(plain(f"{metric} ({unit}), {better} is better"), fontsize=FONT + 1, loc="left")
    axes.grid(axis="x", alpha=0.3)


def _unit(metric: Metric, values: Sequence[float]) -> tuple[float, str]:
    largest = max(values, default=0.0)
    if metric.unit == "s":
        return time_scale(largest)
    if metric.unit == "bytes":
        return (1e-9, "GB") if largest >= 1e9 else (1e-6, "MB")
    if metric.unit == "/s":
        return 1.0, "items/s"
    return 1.0, metric.unit or "value"


def _scaled(value: float | None, scale: float) -> float | None:
    # Infinite PSNR (identical images) has no place on an axis; its text on the right says so.
    return None if value is None or not math.isfinite(value) else value * scale


def _limits(axes: Axes, metric: Metric, values: Sequence[float]) -> None:
    if not values:
        return
    if metric.relative and not log_if_wide(axes, values, "x"):
        # Timings, throughput and memory from zero: the arrow's length is the change's size.
        axes.set_xlim(0, max(values) * 1.12 if max(values) > 0 else 1.0)
    elif not metric.relative:
        low, high = min(values), max(values)
        pad = max(high - low, 1.0) * 0.15
        axes.set_xlim(low - pad, high + pad)


def _legend(figure: Figure, statuses: Sequence[Status]) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], linestyle="", marker="o", color=BASELINE_COLOUR, label="baseline"),
        *(
            Line2D(
                [], [], linestyle="", marker="o", color=COLOURS[status], label=f"current: {status}"
            )
            for status in statuses
        ),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=FONT)


def write_comparison_plot(comparison: Comparison, path: str | Path) -> Path:
    """Draw comparison_figure(comparison) into the PNG file `path` (written whole or not at
    all) and return it. A name not ending in .png raises InputError before anything is drawn;
    without matplotlib, BackendUnavailableError."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"the comparison plot is a PNG image; name it .png, not {path.name!r}")
    write_file_atomic(path, png_bytes(comparison_figure(comparison)))
    return path
