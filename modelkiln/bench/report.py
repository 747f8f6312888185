"""The bench report on disk: report.json (the schema's contract), report.md and PNG plots.

report.json is the measurement; report.md and the plots are views of it that can always be
regenerated. So report.json is written first, and every file goes to a temporary name in the
output folder before `Path.replace` (os.replace) puts it in place: a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.bench.schema import validate_report
from modelkiln.errors import missing_backend

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
LATENCY_PLOT = "latency.png"
ACCURACY_PLOT = "accuracy_vs_latency.png"
SIZE_PLOT = "size.png"

# Fixed pixels and no "Software" tag: the same report gives byte-identical PNGs.
FIGSIZE = (8.0, 4.5)
DPI = 100
# A latency axis spanning more than this ratio is drawn on a log scale.
LOG_SPAN = 30.0
MISSING = "—"

STAGE_LABELS = {
    "text_encoder": "text encoder",
    "unet_step": "UNet per step",
    "vae_decode": "VAE decode",
}
METRIC_LABELS = {
    "top1": "top-1 accuracy (%)",
    "reference_top1_agreement": "top-1 agreement with torch fp32 (%)",
    "reference_cosine": "cosine with torch fp32 (×100)",
    "psnr_db": "worst PSNR vs torch fp32 (dB)",
}

Entry = dict[str, Any]


def write_report(report: dict[str, Any], outdir: Path) -> dict[str, Path]:
    """Validate `report`, then write report.json, report.md and the plots into `outdir`.

    Returns the written paths by kind: json, markdown, latency_plot, size_plot and, when some
    entry has an accuracy score, accuracy_plot. An invalid report raises ReportError before
    anything is written. Without matplotlib, report.json and report.md are written and then
    BackendUnavailableError is raised: the measurements are never lost to a missing plot library.
    """
    validate_report(report)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {"json": outdir / JSON_NAME, "markdown": outdir / MARKDOWN_NAME}
    _write_atomic(paths["json"], (json.dumps(report, indent=2) + "\n").encode())
    _write_atomic(paths["markdown"], markdown(report).encode())
    paths.update(_write_plots(report, outdir))
    return paths


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = _temporary(path)
    try:
        with temporary.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)  # os.replace: atomic within one file system
    finally:
        temporary.unlink(missing_ok=True)


def _temporary(path: Path) -> Path:
    # Same folder, so os.replace never crosses file systems; hidden, so a listing skips it.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_plots(report: dict[str, Any], outdir: Path) -> dict[str, Path]:
    figures = {
        "latency_plot": (LATENCY_PLOT, latency_figure(report)),
        "accuracy_plot": (ACCURACY_PLOT, accuracy_figure(report)),
        "size_plot": (SIZE_PLOT, size_figure(report)),
    }
    paths = {}
    for kind, (name, figure) in figures.items():
        path = outdir / name
        if figure is None:
            # A plot left over from an earlier run here would contradict this report.
            path.unlink(missing_ok=True)
            continue
        _save_atomic(figure, path)
        paths[kind] = path
    return paths


def _save_atomic(figure: Figure, path: Path) -> None:
    temporary = _temporary(path)
    try:
        figure.savefig(temporary, format="png", dpi=DPI, metadata={"Software": None})
        temporary.replace(path)  # os.replace: atomic within one file system
    finally:
        temporary.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Grouping and number formatting shared by the tables and the plots


def artifacts(entries: Sequence[Entry]) -> list[tuple[str, list[Entry]]]:
    """(label, entries by batch size) per artifact, in the order artifacts first appear.

    The label is the artifact directory's name, or its path where two artifacts share a name.
    """
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry["artifact"], []).append(entry)
    names = [group[0]["name"] for group in groups.values()]
    return [
        (
            group[0]["name"] if names.count(group[0]["name"]) == 1 else path,
            sorted(group, key=lambda entry: entry["batch_size"]),
        )
        for path, group in groups.items()
    ]


def baselines(entries: Sequence[Entry]) -> dict[tuple[str, int], Entry]:
    """The first entry of each (task, batch size): what the ratio column is relative to.

    Per task: a diffusion generation against a classifier call is no ratio anyone needs.
    """
    first: dict[tuple[str, int], Entry] = {}
    for entry in entries:
        first.setdefault((entry["task"], entry["batch_size"]), entry)
    return first


def _digits(value: float) -> int:
    # Three significant figures from 0.1 up; no exponent notation in a table.
    magnitude = abs(value)
    return 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3


def _fixed(value: float, digits: int | None = None) -> str:
    return f"{value:.{_digits(value) if digits is None else digits}f}"


def _time_scale(seconds: float) -> tuple[float, str]:
    return (1000.0, "ms") if seconds < 10 else (1.0, "s")


def seconds(value: float) -> str:
    """A time for a table: '12.3 ms' below 10 s, '12.0 s' above."""
    scale, unit = _time_scale(value)
    return f"{_fixed(value * scale)} {unit}"


def size(value: int | None) -> str:
    """Bytes for a table: '400 MB' below 1 GB, '2.50 GB' above (powers of ten)."""
    if value is None:
        return MISSING
    scale, unit = (1e9, "GB") if value >= 1e9 else (1e6, "MB")
    return f"{_fixed(value / scale)} {unit}"


def _mean_stdev(latency: dict[str, Any]) -> str:
    scale, unit = _time_scale(latency["mean_s"])
    mean = latency["mean_s"] * scale
    return f"{_fixed(mean)} ± {_fixed(latency['stdev_s'] * scale, _digits(mean))} {unit}"


def _min_max(latency: dict[str, Any]) -> str:
    scale, unit = _time_scale(latency["max_s"])
    return f"{_fixed(latency['min_s'] * scale)} – {_fixed(latency['max_s'] * scale)} {unit}"


def _ratio(entry: Entry, baseline: Entry) -> str:
    # Above 1: this entry is faster than the baseline.
    p50 = entry["latency"]["p50_s"]
    return f"{baseline['latency']['p50_s'] / p50:.2f}×" if p50 > 0 else MISSING


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}%"


def _psnr(value: float | None) -> str:
    # The schema writes infinite PSNR (identical images) as null.
    return "identical" if value is None else f"{value:.1f} dB"


def _score(accuracy: dict[str, Any]) -> str:
    score = accuracy["score"]
    if accuracy["metric"] == "psnr_db":
        return _psnr(score)
    return _percent(score)


def _threads(report: dict[str, Any]) -> str:
    threads = report["settings"]["threads"]
    if threads is not None:
        return f"{threads} threads"
    used = sorted({entry["threads"] for entry in report["entries"] if entry["threads"]})
    listed = f" ({', '.join(map(str, used))})" if used else ""
    return f"threads as each profile says{listed}"


def _joined(values: Iterable[object]) -> str:
    return ", ".join(str(value) for value in values)


# ---------------------------------------------------------------------------------------------
# report.md


def markdown(report: dict[str, Any]) -> str:
    """report.md: the machine, the settings, then latency, stages, memory and accuracy tables."""
    entries = report["entries"]
    sections = [
        _title(report),
        _machine_section(report),
        _settings_section(report),
        _latency_section(entries),
    ]
    if any(entry["stages"] for entry in entries):
        sections.append(_stages_section(report))
    sections.append(_memory_section(report))
    if any(entry["accuracy"] for entry in entries):
        sections.append(_accuracy_section(entries))
    sections.append(_plots_section(report))
    return "\n\n".join(sections) + "\n"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """A markdown table; the first `left` columns are text, the others right-aligned numbers."""
    rule = [":--" if column < left else "--:" for column in range(len(header))]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(_cell(cell) for cell in line) + " |" for line in lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _title(report: dict[str, Any]) -> str:
    entries = report["entries"]
    return (
        "# modelkiln bench report\n\n"
        f"Created {report['created']} by modelkiln {report['modelkiln_version']}: "
        f"{len(entries)} entries over {len(artifacts(entries))} artifacts. "
        "Times are in ms below 10 s and in s above; sizes in MB (10⁶ bytes) below 1 GB."
    )


def _machine_section(report: dict[str, Any]) -> str:
    machine = report["machine"]
    cpu = machine["cpu"]
    cores = f"{_count(cpu['logical_cores'])} logical cores, {_count(cpu['usable_cores'])} usable"
    libraries = _joined(f"{name} {version}" for name, version in machine["libraries"].items())
    lines = [
        f"- CPU: {cpu['model']} ({cores})",
        f"- features: {_features(cpu['features'])}",
        f"- threads used: {_threads(report)}",
        f"- platform: {machine['platform']} ({machine['machine']}), Python {machine['python']}",
        f"- libraries: {libraries or MISSING}",
        f"- fingerprint: {machine['fingerprint']}",
    ]
    return "## Machine\n\n" + "\n".join(lines)


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _features(features: Sequence[str]) -> str:
    avx512 = "yes" if any(name.startswith("avx512") for name in features) else "no"
    amx = "yes" if any(name.startswith("amx") for name in features) else "no"
    listed = _joined(features) if features else "none detected"
    return f"{listed} (AVX-512: {avx512}, AMX: {amx})"


def _settings_section(report: dict[str, Any]) -> str:
    settings = report["settings"]
    if settings["duration_s"] is not None:
        timing = f"- timed: {_fixed(settings['duration_s'])} s budget per batch size"
    else:
        timing = f"- timed runs: {settings['runs']} per batch size"
    isolation = "each artifact in its own process" if settings["isolate"] else "one process"
    runtime = settings["runtime"] or "each artifact's own"
    lines = [
        timing,
        f"- warmup: {settings['warmup']} untimed runs",
        f"- batch sizes: {_joined(settings['batch_sizes'])}",
        f"- isolation: {isolation}",
        f"- runtime: {runtime}",
    ]
    if any(entry["stages"] for entry in report["entries"]):
        lines.append(f"- diffusion steps: {settings['steps']}")
    if settings["data"]:
        lines.append(f"- accuracy data: {settings['data']}")
    if settings["prompts"]:
        lines.append(f"- prompts: {len(settings['prompts'])}")
    return "## Settings\n\n" + "\n".join(lines)


LATENCY_HEADER = (
    "artifact",
    "runtime",
    "batch",
    "p50",
    "p90",
    "p99",
    "mean ± stdev",
    "min – max",
    "items/s",
    "ratio",
    "load",
    "first inference",
)


def _latency_section(entries: Sequence[Entry]) -> str:
    intro = (
        "## Latency\n\n"
        "One call at the given batch size (for diffusion models, one whole generation)."
    )
    if not entries:
        return intro + "\n\nNo entries."
    first = baselines(entries)
    rows = [
        _latency_row(label, entry, first[entry["task"], entry["batch_size"]])
        for label, group in artifacts(entries)
        for entry in group
    ]
    return f"{intro}\n\n{_table(LATENCY_HEADER, rows, left=2)}\n\n{_baseline_note(entries)}"


def _latency_row(label: str, entry: Entry, baseline: Entry) -> list[str]:
    latency = entry["latency"]
    return [
        label,
        entry["runtime"],
        str(entry["batch_size"]),
        seconds(latency["p50_s"]),
        seconds(latency["p90_s"]),
        seconds(latency["p99_s"]),
        _mean_stdev(latency),
        _min_max(latency),
        _fixed(entry["throughput_per_s"]),
        _ratio(entry, baseline),
        seconds(entry["load_s"]),
        seconds(entry["first_inference_s"]),
    ]


def _baseline_note(entries: Sequence[Entry]) -> str:
    labels = {id(entry): label for label, group in artifacts(entries) for entry in group}
    batches: dict[str, list[int]] = {}
    for (_, batch_size), entry in sorted(baselines(entries).items()):
        batches.setdefault(labels[id(entry)], []).append(batch_size)
    named = "; ".join(f"{label} (batch {_joined(sizes)})" for label, sizes in batches.items())
    return (
        "ratio: the baseline's p50 divided by this row's p50, so above 1.00× is faster than the "
        "baseline. The baseline is whatever entry of the same task comes first at each batch "
        "size, here: "
        f"{named}."
    )


def _stages_section(report: dict[str, Any]) -> str:
    entries = [entry for entry in report["entries"] if entry["stages"]]
    names = list(dict.fromkeys(name for entry in entries for name in entry["stages"]))
    header = [
        "artifact",
        "batch",
        *(f"{STAGE_LABELS.get(name, name.replace('_', ' '))} p50" for name in names),
        "images/s",
    ]
    rows = [
        [label, str(entry["batch_size"]), *_stage_cells(entry, names), _images_per_s(entry)]
        for label, group in artifacts(entries)
        for entry in group
    ]
    note = (
        f"p50 of one call of each stage; the UNet runs once per denoising step "
        f"({report['settings']['steps']} steps per image)."
    )
    return f"## Diffusion stages\n\n{_table(header, rows)}\n\n{note}"


def _stage_cells(entry: Entry, names: Sequence[str]) -> list[str]:
    stages = entry["stages"]
    return [seconds(stages[name]["p50_s"]) if name in stages else MISSING for name in names]


def _images_per_s(entry: Entry) -> str:
    value = entry["images_per_s"]
    return MISSING if value is None else _fixed(value)


def _memory_section(report: dict[str, Any]) -> str:
    header = ("artifact", "runtime", "format", "peak RSS", "size on disk")
    rows = [
        [
            label,
            group[0]["runtime"],
            group[0]["format"],
            size(_peak_rss(group)),
            size(group[0]["size_bytes"]),
        ]
        for label, group in artifacts(report["entries"])
    ]
    note = "Peak RSS is the measuring process's, the largest over the artifact's batch sizes."
    if not report["settings"]["isolate"]:
        note += " Measured without isolation: it includes every artifact measured before."
    return f"## Memory and size\n\n{_table(header, rows, left=3)}\n\n{note}"


def _peak_rss(group: Sequence[Entry]) -> int | None:
    measured = [entry["peak_rss_bytes"] for entry in group if entry["peak_rss_bytes"] is not None]
    return max(measured) if measured else None


# (header, accuracy field, format): a column appears when some artifact has the field.
ACCURACY_COLUMNS = (
    ("images", "images", str),
    ("top-1", "top1", _percent),
    ("top-5", "top5", _percent),
    ("agreement", "reference_top1_agreement", _percent),
    ("cosine", "reference_cosine", lambda value: f"{value:.5f}"),
    ("PSNR", "psnr_db", lambda values: _joined(_psnr(value) for value in values)),
    ("SSIM", "ssim", lambda values: _joined(f"{value:.4f}" for value in values)),
)


def _accuracy_section(entries: Sequence[Entry]) -> str:
    measured = [(label, _accuracy(group)) for label, group in artifacts(entries)]
    columns = [
        column
        for column in ACCURACY_COLUMNS
        if any(accuracy and accuracy.get(column[1]) not in (None, []) for _, accuracy in measured)
    ]
    header = ["artifact", "metric", "score", *(title for title, _, _ in columns)]
    rows = [[label, *_accuracy_cells(accuracy, columns)] for label, accuracy in measured]
    note = "Higher is better; a PSNR of identical images (infinite) reads 'identical'."
    return f"## Accuracy\n\n{_table(header, rows, left=2)}\n\n{note}"


def _accuracy(group: Sequence[Entry]) -> dict[str, Any] | None:
    return next((entry["accuracy"] for entry in group if entry["accuracy"]), None)


def _accuracy_cells(
    accuracy: dict[str, Any] | None, columns: Sequence[tuple[Any, ...]]
) -> list[str]:
    if accuracy is None:
        return [MISSING] * (2 + len(columns))
    cells = [accuracy["metric"], _score(accuracy)]
    for _, field, show in columns:
        value = accuracy.get(field)
        cells.append(MISSING if value in (None, []) else show(value))
    return cells


def _plots_section(report: dict[str, Any]) -> str:
    plots = [f"![p50 latency per call]({LATENCY_PLOT})"]
    if _accuracy_points(report["entries"]):
        plots.append(f"![accuracy against p50 latency]({ACCURACY_PLOT})")
    plots.append(f"![size on disk]({SIZE_PLOT})")
    return "## Plots\n\n" + "\n\n".join(plots)


# ---------------------------------------------------------------------------------------------
# Plots: matplotlib's object API only (no pyplot), so nothing touches global state.


def _figure(report: dict[str, Any], title: str) -> tuple[Figure, Axes]:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise missing_backend("matplotlib", "bench") from error
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    figure.suptitle(_plain(title))
    axes = figure.add_subplot()
    cpu = report["machine"]["cpu"]["model"]
    axes.set_title(_plain(f"{cpu} · {_threads(report)}"), fontsize=8, color="0.35")
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


def _accuracy_points(entries: Sequence[Entry]) -> list[tuple[str, Entry]]:
    """(label, entry at the artifact's smallest batch size) for every artifact with a score."""
    points = []
    for label, group in artifacts(entries):
        accuracy = _accuracy(group)
        if accuracy is not None and accuracy["score"] is not None:
            points.append((label, {**group[0], "accuracy": accuracy}))
    return points


def accuracy_figure(report: dict[str, Any]) -> Figure | None:
    """Accuracy score against p50 latency at the smallest batch size; None without scores."""
    points = _accuracy_points(report["entries"])
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
