"""The report's PNG plots: matplotlib's object API only (no pyplot), so nothing touches global
state; fixed pixels and no "Software" tag, so the same report gives byte-identical PNGs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from modelkiln.bench.formatting import (
    METRIC_LABELS,
    Entry,
    accuracy_of,
    artifacts,
    size,
    threads,
)
from modelkiln.errors import missing_backend

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LATENCY_PLOT = "latency.png"
ACCURACY_PLOT = "accuracy_vs_latency.png"
SIZE_PLOT = "size.png"
FIGSIZE = (8.0, 4.5)
DPI = 100
# A latency axis spanning more than this ratio is drawn on a log scale.
LOG_SPAN = 30.0


def _figure(report: dict[str, Any], title: str) -> tuple[Figure, Axes]:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise missing_backend("matplotlib", "bench") from error
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    figure.suptitle(_plain(title))
    axes = figure.add_subplot()
    cpu = report["machine"]["cpu"]["model"]
    axes.set_title(_plain(f"{cpu} · {threads(report)}"), fontsize=8, color="0.35")
    return figure, axes


def _plain(text: str) -> str:
    # Names are user text: a '$' pair would otherwise turn on matplotlib's mathtext.
    return text.replace("$", r"\$")


def _log_if_wide(axes: Axes, values: Sequence[float], axis: str) -> None:
    positive = [value for value in values if value > 0]
    if not positive or max(positive) / min(positive) <= LOG_SPAN:
        return
    if axis == "y":
        axes.set_yscale("log")
    else:
        axes.set_xscale("log")


def latency_figure(report: dict[str, Any]) -> Figure:
    """p50 bars per artifact, one group per batch size; whiskers to p90, a marker at p99."""
    figure, axes = _figure(report, "p50 latency per call (whisker: p90, marker: p99)")
    entries = report["entries"]
    groups = artifacts(entries)
    batch_sizes = sorted({entry["batch_size"] for entry in entries})
    width = 0.8 / max(len(groups), 1)
    for index, (label, group) in enumerate(groups):
        offset = (index - (len(groups) - 1) / 2) * width
        _latency_bars(axes, group, batch_sizes, offset, width, index, label)
    axes.set_xticks(range(len(batch_sizes)), [f"batch {size}" for size in batch_sizes])
    axes.set_xlabel("batch size")
    axes.set_ylabel("latency per call (ms)")
    ms = [entry["latency"][key] * 1000 for entry in entries for key in ("p50_s", "p99_s")]
    _log_if_wide(axes, ms, "y")
    if groups:
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, "no entries", ha="center", transform=axes.transAxes)
    return figure


def _latency_bars(
    axes: Axes,
    group: Sequence[Entry],
    batch_sizes: Sequence[int],
    offset: float,
    width: float,
    index: int,
    label: str,
) -> None:
    # A missing batch size just leaves a gap in its group.
    positions = [batch_sizes.index(entry["batch_size"]) + offset for entry in group]
    p50 = [entry["latency"]["p50_s"] * 1000 for entry in group]
    p90 = [entry["latency"]["p90_s"] * 1000 for entry in group]
    p99 = [entry["latency"]["p99_s"] * 1000 for entry in group]
    above = [max(high - mid, 0.0) for mid, high in zip(p50, p90, strict=True)]
    color = f"C{index % 10}"
    axes.bar(
        positions,
        p50,
        width,
        yerr=[[0.0] * len(p50), above],
        error_kw={"elinewidth": 1.2},
        color=color,
        label=_plain(label),
    )
    axes.scatter(
        positions,
        p99,
        marker="_",
        s=120,
        color="black",
        zorder=3,
        label="p99" if index == 0 else None,
    )


def accuracy_points(entries: Sequence[Entry]) -> list[tuple[str, Entry]]:
    """(label, entry at the artifact's smallest batch size) for every artifact with a score."""
    points = []
    for label, group in artifacts(entries):
        accuracy = accuracy_of(group)
        if accuracy is not None and accuracy["score"] is not None:
            points.append((label, {**group[0], "accuracy": accuracy}))
    return points


def accuracy_figure(report: dict[str, Any]) -> Figure | None:
    """Accuracy score against p50 latency at the smallest batch size; None without scores."""
    points = accuracy_points(report["entries"])
    if not points:
        return None
    figure, axes = _figure(report, "accuracy against latency (up and left is better)")
    latencies = [entry["latency"]["p50_s"] * 1000 for _, entry in points]
    scores = [entry["accuracy"]["score"] for _, entry in points]
    for index, ((label, _), x, y) in enumerate(zip(points, latencies, scores, strict=True)):
        axes.scatter([x], [y], color=f"C{index % 10}", zorder=3)
        axes.annotate(_plain(label), (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
    batch_sizes = sorted({entry["batch_size"] for _, entry in points})
    at = f"batch {batch_sizes[0]}" if len(batch_sizes) == 1 else "each artifact's smallest batch"
    axes.set_xlabel(f"p50 latency at {at} (ms)")
    metrics = dict.fromkeys(entry["accuracy"]["metric"] for _, entry in points)
    axes.set_ylabel(" / ".join(METRIC_LABELS.get(metric, metric) for metric in metrics))
    axes.margins(0.2)
    _log_if_wide(axes, latencies, "x")
    axes.grid(alpha=0.3)
    return figure


def size_figure(report: dict[str, Any]) -> Figure:
    """Size on disk per artifact (MB), one horizontal bar each, in report order top down."""
    figure, axes = _figure(report, "size on disk")
    groups = artifacts(report["entries"])
    megabytes = [group[0]["size_bytes"] / 1e6 for _, group in groups]
    bars = axes.barh(
        range(len(groups)),
        megabytes,
        color=[f"C{index % 10}" for index in range(len(groups))],
        tick_label=[_plain(label) for label, _ in groups],
    )
    axes.bar_label(
        bars, labels=[size(group[0]["size_bytes"]) for _, group in groups], padding=3, fontsize=8
    )
    axes.invert_yaxis()
    axes.margins(x=0.2)
    _log_if_wide(axes, megabytes, "x")
    axes.set_xlabel("size on disk (MB, 10⁶ bytes)")
    return figure
