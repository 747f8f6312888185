"""The bench report on disk: report.json (the schema's contract), report.md and PNG plots.

report.json is the measurement; report.md and the plots are views of it that can always be
regenerated. So report.json is written first, and every file goes to a temporary name in the
output folder before it is renamed into place (outputs.py): a crash never leaves half a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelkiln.bench.formatting import (
    MISSING,
    STAGE_LABELS,
    Entry,
    accuracy_of,
    artifacts,
    baselines,
    fixed,
    joined,
    mean_stdev,
    min_max,
    percent,
    psnr,
    ratio,
    score,
    seconds,
    size,
    threads,
)
from modelkiln.bench.plots import (
    ACCURACY_PLOT,
    DPI,
    LATENCY_PLOT,
    SIZE_PLOT,
    accuracy_figure,
    accuracy_points,
    latency_figure,
    size_figure,
)
from modelkiln.bench.schema import validate_report
from modelkiln.outputs import atomic_file, write_file_atomic

if TYPE_CHECKING:
    pass

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"


def write_report(report: dict[str, Any], outdir: Path) -> dict[str, Path]:
    """Validate `report`, then write report.json, report.md and the plots into `outdir`.

    Returns the written paths by kind: json, markdown, latency_plot, size_plot and, when some
    entry has an accuracy score, accuracy_plot. An invalid report raises ReportError before
    anything is written. Without matplotlib, report.json and report.md are written and then
    BackendUnavailableError is raised: the measurements are never lost to a missing plot library.
    """
    validate_report(report)
    outdir = Path(outdir)
    paths = {"json": outdir / JSON_NAME, "markdown": outdir / MARKDOWN_NAME}
    write_file_atomic(paths["json"], (json.dumps(report, indent=2) + "\n").encode())
    write_file_atomic(paths["markdown"], markdown(report).encode())
    paths.update(_write_plots(report, outdir))
    return paths


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
        with atomic_file(path) as staged:
            figure.savefig(staged, format="png", dpi=DPI, metadata={"Software": None})
        paths[kind] = path
    return paths


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
    libraries = joined(f"{name} {version}" for name, version in machine["libraries"].items())
    lines = [
        f"- CPU: {cpu['model']} ({cores})",
        f"- features: {_features(cpu['features'])}",
        f"- threads used: {threads(report)}",
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
    listed = joined(features) if features else "none detected"
    return f"{listed} (AVX-512: {avx512}, AMX: {amx})"


def _settings_section(report: dict[str, Any]) -> str:
    settings = report["settings"]
    if settings["duration_s"] is not None:
        timing = f"- timed: {fixed(settings['duration_s'])} s budget per batch size"
    else:
        timing = f"- timed runs: {settings['runs']} per batch size"
    isolation = "each artifact in its own process" if settings["isolate"] else "one process"
    runtime = settings["runtime"] or "each artifact's own"
    lines = [
        timing,
        f"- warmup: {settings['warmup']} untimed runs",
        f"- batch sizes: {joined(settings['batch_sizes'])}",
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
        mean_stdev(latency),
        min_max(latency),
        fixed(entry["throughput_per_s"]),
        ratio(entry, baseline),
        seconds(entry["load_s"]),
        seconds(entry["first_inference_s"]),
    ]


def _baseline_note(entries: Sequence[Entry]) -> str:
    labels = {id(entry): label for label, group in artifacts(entries) for entry in group}
    batches: dict[str, list[int]] = {}
    for (_, batch_size), entry in sorted(baselines(entries).items()):
        batches.setdefault(labels[id(entry)], []).append(batch_size)
    named = "; ".join(f"{label} (batch {joined(sizes)})" for label, sizes in batches.items())
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
        f"p50 of one call of each stage; the UNet or transformer runs once per denoising step "
        f"({report['settings']['steps']} steps per image)."
    )
    return f"## Diffusion stages\n\n{_table(header, rows)}\n\n{note}"


def _stage_cells(entry: Entry, names: Sequence[str]) -> list[str]:
    stages = entry["stages"]
    return [seconds(stages[name]["p50_s"]) if name in stages else MISSING for name in names]


def _images_per_s(entry: Entry) -> str:
    value = entry["images_per_s"]
    return MISSING if value is None else fixed(value)


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
    ("top-1", "top1", percent),
    ("top-5", "top5", percent),
    ("agreement", "reference_top1_agreement", percent),
    ("cosine", "reference_cosine", lambda value: f"{value:.5f}"),
    ("PSNR", "psnr_db", lambda values: joined(psnr(value) for value in values)),
    ("SSIM", "ssim", lambda values: joined(f"{value:.4f}" for value in values)),
)


def _accuracy_section(entries: Sequence[Entry]) -> str:
    measured = [(label, accuracy_of(group)) for label, group in artifacts(entries)]
    columns = [
        column
        for column in ACCURACY_COLUMNS
        if any(accuracy and accuracy.get(column[1]) not in (None, []) for _, accuracy in measured)
    ]
    header = ["artifact", "metric", "score", *(title for title, _, _ in columns)]
    rows = [[label, *_accuracy_cells(accuracy, columns)] for label, accuracy in measured]
    note = "Higher is better; a PSNR of identical images (infinite) reads 'identical'."
    return f"## Accuracy\n\n{_table(header, rows, left=2)}\n\n{note}"


def _accuracy_cells(
    accuracy: dict[str, Any] | None, columns: Sequence[tuple[Any, ...]]
) -> list[str]:
    if accuracy is None:
        return [MISSING] * (2 + len(columns))
    cells = [accuracy["metric"], score(accuracy)]
    for _, field, show in columns:
        value = accuracy.get(field)
        cells.append(MISSING if value in (None, []) else show(value))
    return cells


def _plots_section(report: dict[str, Any]) -> str:
    plots = [f"![p50 latency per call]({LATENCY_PLOT})"]
    if accuracy_points(report["entries"]):
        plots.append(f"![accuracy against p50 latency]({ACCURACY_PLOT})")
    plots.append(f"![size on disk]({SIZE_PLOT})")
    return "## Plots\n\n" + "\n\n".join(plots)
