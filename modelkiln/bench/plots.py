"""The report's plots: which figures a report gets, and drawing each one.

One figure per task and batch size, never one axis across tasks: a whole diffusion generation
and a single classifier call share no scale. Latency per (task, batch): p50 bars with p90 / p99
whiskers; stages per (task, batch): where a generation's time goes; accuracy per (task,
metric): score against latency with the Pareto front; size per task. Each artifact keeps its
colour in every figure. Which plots exist (`report_plots`) needs no matplotlib, so report.md can
name them anywhere; drawing (`draw`) does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modelkiln.bench.figures import (
    FONT,
    log_if_wide,
    new_figure,
    plain,
    slug,
    titled_axes,
)
from modelkiln.bench.formatting import (
    METRIC_LABELS,
    Entry,
    accuracy_of,
    artifacts,
    fixed,
    size,
    threads,
    time_scale,
)
from modelkiln.bench.sections import stage_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# In the order report.md lists them.
KINDS = ("latency", "stages", "accuracy", "size")
# Scores in percent never plot above this.
PERCENT_CAP = 100.0
# The least span of a score axis, in the score's unit: identical scores are not zoomed into noise.
MIN_SCORE_SPAN = 4.0
# Light enough that a stage's time reads inside its segment; the rest of a generation is grey.
STAGE_COLOURS = ("#8dd3c7", "#fdb462", "#bebada", "#fb8072", "#80b1d3", "#b3de69", "#fccde5")
OTHER_COLOUR = "#d9d9d9"
# With more artifacts than colours, the marker shape tells them apart.
MARKERS = ("o", "s", "^", "D", "v", "P")

Point = tuple[str, Entry]


@dataclass(frozen=True)
class Plot:
    """One figure of a report: its kind, file name, what it shows, and the (artifact label,
    entry) pairs it draws in report order."""

    kind: str
    name: str
    title: str
    points: tuple[Point, ...]


def report_plots(report: dict[str, Any]) -> list[Plot]:
    """Every plot `report` gets, by kind, then task in order of appearance, then batch."""
    tasks = _by_task(report["entries"])
    plots = []
    for task, points in tasks.items():
        for batch, group in _batches(points).items():
            what = "generation" if any(entry["stages"] for _, entry in group) else "call"
            title = f"{task} · batch {batch}: latency per {what}"
            plots.append(Plot("latency", f"latency-{slug(task)}-b{batch}.png", title, group))
    for task, points in tasks.items():
        staged = [point for point in points if point[1]["stages"]]
        for batch, group in _batches(staged).items():
            title = f"{task} · batch {batch}: time per generation by stage"
            plots.append(Plot("stages", f"stages-{slug(task)}-b{batch}.png", title, group))
    for (task, metric), scored in _scored(report["entries"]).items():
        title = f"{task}: {METRIC_LABELS.get(metric, metric)} against latency"
        name = f"accuracy-{slug(task)}-{slug(metric)}.png"
        plots.append(Plot("accuracy", name, title, tuple(scored)))
    for task, points in tasks.items():
        # One bar per artifact: its size is the same at every batch size.
        first: dict[str, Entry] = {}
        for label, entry in points:
            first.setdefault(label, entry)
        title = f"{task}: size on disk"
        plots.append(Plot("size", f"size-{slug(task)}.png", title, tuple(first.items())))
    return plots


def _batches(points: Sequence[Point]) -> dict[int, tuple[Point, ...]]:
    """batch size -> its points in their order, smallest batch size first."""
    batches = sorted({entry["batch_size"] for _, entry in points})
    return {batch: tuple(p for p in points if p[1]["batch_size"] == batch) for batch in batches}


def _by_task(entries: Sequence[Entry]) -> dict[str, list[Point]]:
    """task -> (label, entry) in artifact order, then batch size; labels as the tables'."""
    tasks: dict[str, list[Point]] = {entry["task"]: [] for entry in entries}
    for label, group in artifacts(entries):
        for entry in group:
            tasks[entry["task"]].append((label, entry))
    return tasks


def _scored(entries: Sequence[Entry]) -> dict[tuple[str, str], list[Point]]:
    """(task, metric) -> (label, entry at the artifact's smallest batch with its accuracy)
    for every artifact with a finite score: infinite PSNR has no place on an axis."""
    scored: dict[tuple[str, str], list[Point]] = {}
    for label, group in artifacts(entries):
        accuracy = accuracy_of(group)
        if accuracy is not None and accuracy["score"] is not None:
            key = (group[0]["task"], accuracy["metric"])
            scored.setdefault(key, []).append((label, {**group[0], "accuracy": accuracy}))
    return scored


def draw(report: dict[str, Any], plot: Plot) -> Figure:
    """The figure of one of `report_plots(report)`."""
    return DRAW[plot.kind](report, plot)


def _machine(report: dict[str, Any]) -> str:
    return f"{report['machine']['cpu']['model']} · {threads(report)}"


def _styles(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """artifact label -> (colour, marker), the same in every figure of the report."""
    return {
        label: (f"C{index % 10}", MARKERS[index // 10 % len(MARKERS)])
        for index, (label, _) in enumerate(artifacts(report["entries"]))
    }


def _height(rows: int) -> float:
    return max(3.0, 1.9 + 0.42 * rows)


def _artifact_axis(axes: Axes, points: Sequence[Point]) -> None:
    """One row per artifact, in report order top down."""
    axes.set_yticks(range(len(points)), [plain(label) for label, _ in points])
    axes.set_ylim(len(points) - 0.5, -0.5)
    axes.grid(axis="x", alpha=0.3)
    axes.set_axisbelow(True)


def latency_figure(report: dict[str, Any], plot: Plot) -> Figure:
    """p50 as a bar per artifact, a whisker on to p90 and a dotted one on to p99."""
    figure = new_figure(_height(len(plot.points)))  # first: it says when matplotlib is missing
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    axes = titled_axes(figure, plot.title, _machine(report))
    styles = _styles(report)
    latencies = [entry["latency"] for _, entry in plot.points]
    scale, unit = time_scale(max(latency["p99_s"] for latency in latencies))
    p50, p90, p99 = (
        [latency[key] * scale for latency in latencies] for key in ("p50_s", "p90_s", "p99_s")
    )
    rows = range(len(plot.points))
    colours = [styles[label][0] for label, _ in plot.points]
    axes.barh(rows, p50, height=0.6, color=colours)
    axes.hlines(rows, p50, p90, colors="black", linewidth=1.2)
    axes.scatter(p90, rows, marker="|", s=140, color="black", zorder=3)
    axes.hlines(rows, p90, p99, colors="black", linewidth=0.8, linestyles=":")
    axes.scatter(p99, rows, marker="D", s=14, color="black", zorder=3)
    for row, (mid, high) in enumerate(zip(p50, p99, strict=True)):
        text = f"{fixed(mid)} {unit}"
        axes.annotate(text, (high, row), xytext=(6, 0), textcoords="offset points", va="center")
    # Room on the right for the p50 labels: they sit beside the whiskers, never on them.
    axes.set_xlim(0, max(p99) * 1.25 if max(p99) > 0 else 1.0)
    _artifact_axis(axes, plot.points)
    axes.set_xlabel(f"latency per call ({unit})")
    handles = [
        Patch(color="0.6", label="p50 (bar, value at right)"),
        Line2D([], [], color="black", marker="|", markersize=10, label="p90"),
        Line2D([], [], color="black", marker="D", markersize=4, linestyle=":", label="p99"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=FONT)
    return figure


def stages_figure(report: dict[str, Any], plot: Plot) -> Figure:
    """Each stage's calls summed over one generation, stacked; the rest of the generation's
    mean time (scheduler, pre- and post-processing) as 'other'."""
    figure = new_figure(_height(len(plot.points)))
    axes = titled_axes(figure, plot.title, _machine(report))
    names = list(dict.fromkeys(name for _, entry in plot.points for name in entry["stages"]))
    spent = [_stage_seconds(entry, names) for _, entry in plot.points]
    totals = [
        max(sum(parts), entry["latency"]["mean_s"])
        for parts, (_, entry) in zip(spent, plot.points, strict=True)
    ]
    scale, unit = time_scale(max(totals))
    segments = [*names, "other"]
    colours = [*(STAGE_COLOURS[i % len(STAGE_COLOURS)] for i in range(len(names))), OTHER_COLOUR]
    left = [0.0] * len(plot.points)
    for index, (name, colour) in enumerate(zip(segments, colours, strict=True)):
        widths = [
            (parts[index] if index < len(names) else total - sum(parts)) * scale
            for parts, total in zip(spent, totals, strict=True)
        ]
        label = "other" if index == len(names) else _stage_legend(name, plot.points)
        bars = axes.barh(range(len(widths)), widths, 0.6, left=left, color=colour, label=label)
        # A segment's time inside it where it fits; the total at the end of the bar.
        fits = 0.07 * max(totals) * scale
        shown = [fixed(width) if width >= fits else "" for width in widths]
        axes.bar_label(bars, shown, label_type="center", fontsize=FONT)
        left = [start + width for start, width in zip(left, widths, strict=True)]
    for row, total in enumerate(totals):
        axes.annotate(
            f"{fixed(total * scale)} {unit}",
            (total * scale, row),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
        )
    axes.set_xlim(0, max(totals) * scale * 1.2 if max(totals) > 0 else 1.0)
    _artifact_axis(axes, plot.points)
    axes.set_xlabel(f"mean time per generation ({unit}), each stage's calls summed")
    figure.legend(loc="outside lower center", ncols=min(len(segments), 4), fontsize=FONT)
    return figure


def _stage_seconds(entry: Entry, names: Sequence[str]) -> list[float]:
    """Seconds per generation in each stage: its measured calls' total over the generations."""
    generations = entry["latency"]["runs"]
    stages = entry["stages"]
    return [
        stages[name]["mean_s"] * stages[name]["runs"] / generations if name in stages else 0.0
        for name in names
    ]


def _stage_legend(name: str, points: Sequence[Point]) -> str:
    # Calls per generation (e.g. one UNet call per step), when every entry agrees.
    calls = {
        round(entry["stages"][name]["runs"] / entry["latency"]["runs"], 1)
        for _, entry in points
        if name in entry["stages"]
    }
    label = plain(stage_label(name))
    if len(calls) != 1:
        return label
    (count,) = calls
    return f"{label} × {count:g}"


def accuracy_figure(report: dict[str, Any], plot: Plot) -> Figure:
    """Score against p50 latency, one point per artifact at its smallest batch size; the
    Pareto front (nothing else both faster and better) filled and joined, the rest hollow."""
    figure = new_figure(4.5)  # first: it says when matplotlib is missing
    from matplotlib.lines import Line2D

    axes = titled_axes(figure, plot.title, _machine(report))
    styles = _styles(report)
    scale, unit = time_scale(max(entry["latency"]["p50_s"] for _, entry in plot.points))
    xs = [entry["latency"]["p50_s"] * scale for _, entry in plot.points]
    ys = [entry["accuracy"]["score"] for _, entry in plot.points]
    front = pareto_front(list(zip(xs, ys, strict=True)))
    handles = []
    for index, ((label, _), x, y) in enumerate(zip(plot.points, xs, ys, strict=True)):
        colour, marker = styles[label]
        face = colour if index in front else "none"
        # Not clipped: a score of exactly 100 % sits on the axis' top edge.
        dot = axes.scatter([x], [y], s=60, marker=marker, facecolors=face, edgecolors=colour)
        dot.set_clip_on(False)
        handles.append(
            Line2D([], [], linestyle="", marker=marker, color=colour, label=plain(label))
        )
    steps = sorted((xs[index], ys[index]) for index in front)
    (line,) = axes.step(
        [x for x, _ in steps], [y for _, y in steps], where="post", color="0.4", linestyle="--"
    )
    line.set_label("Pareto front (filled)")
    handles.append(line)
    metric = plot.points[0][1]["accuracy"]["metric"]
    axes.set_ylim(*score_limits(ys, percent=metric != "psnr_db"))
    if not log_if_wide(axes, xs, "x"):
        axes.set_xlim(0, max(xs) * 1.15 if max(xs) > 0 else 1.0)
    batches = sorted({entry["batch_size"] for _, entry in plot.points})
    at = f"batch {batches[0]}" if len(batches) == 1 else "each artifact's smallest batch"
    axes.set_xlabel(f"p50 latency at {at} ({unit}); left is faster")
    axes.set_ylabel(f"{METRIC_LABELS.get(metric, metric)}; up is better")
    axes.grid(alpha=0.3)
    ncols = min(len(handles), 3)
    figure.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize=FONT)
    return figure


def pareto_front(points: Sequence[tuple[float, float]]) -> set[int]:
    """Indices of the (latency, score) points no other point beats on both: as fast or faster
    and strictly better, or strictly faster and as good."""
    front = set()
    for index, (x, y) in enumerate(points):
        beaten = any(
            (ox <= x and oy > y) or (ox < x and oy >= y)
            for other, (ox, oy) in enumerate(points)
            if other != index
        )
        if not beaten:
            front.add(index)
    return front


def score_limits(scores: Sequence[float], *, percent: bool) -> tuple[float, float]:
    """A score axis at least MIN_SCORE_SPAN wide around the scores, with a margin; percentages
    end at 100 and start at 0 at the widest."""
    low, high = min(scores), max(scores)
    span = max(high - low, MIN_SCORE_SPAN)
    middle = (low + high) / 2
    bottom, top = middle - 0.65 * span, middle + 0.65 * span
    if percent:
        if top > PERCENT_CAP:
            bottom, top = bottom - (top - PERCENT_CAP), PERCENT_CAP
        bottom = max(bottom, 0.0)
    return bottom, top


def size_figure(report: dict[str, Any], plot: Plot) -> Figure:
    """Size on disk per artifact, one horizontal bar each, in report order top down."""
    figure = new_figure(_height(len(plot.points)) - 0.4)
    axes = titled_axes(figure, plot.title, _machine(report))
    styles = _styles(report)
    megabytes = [entry["size_bytes"] / 1e6 for _, entry in plot.points]
    bars = axes.barh(
        range(len(megabytes)), megabytes, 0.6, color=[styles[label][0] for label, _ in plot.points]
    )
    labels = [size(entry["size_bytes"]) for _, entry in plot.points]
    axes.bar_label(bars, labels, padding=4, fontsize=FONT)
    if not log_if_wide(axes, megabytes, "x"):
        axes.set_xlim(0, max(megabytes) * 1.25 if max(megabytes) > 0 else 1.0)
    else:
        axes.margins(x=0.25)
    _artifact_axis(axes, plot.points)
    axes.set_xlabel("size on disk (MB, 10⁶ bytes)")
    return figure


DRAW: dict[str, Callable[[dict[str, Any], Plot], Figure]] = {
    "latency": latency_figure,
    "stages": stages_figure,
    "accuracy": accuracy_figure,
    "size": size_figure,
}
