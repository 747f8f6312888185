"""What the report says, section by section, as text and tables: report.md (report.py) and
report.html (html_report.py) render the same sections, so both always say the same thing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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

TITLE = "modelkiln bench report"


@dataclass(frozen=True)
class Table:
    """A table of text cells; the first `left` columns are text, the others numbers."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    left: int = 1


@dataclass(frozen=True)
class Section:
    """One titled part of the report: an intro, a list, a table and a note, each optional.

    `plots` names the kind of plot (plots.py) that shows the same numbers: report.html places
    those plots inside the section.
    """

    title: str
    intro: str = ""
    items: tuple[str, ...] = ()
    table: Table | None = None
    note: str = ""
    plots: str = ""


def summary(report: dict[str, Any]) -> str:
    """The line under the title: when, by what, how much, and the units."""
    entries = report["entries"]
    return (
        f"Created {report['created']} by modelkiln {report['modelkiln_version']}: "
        f"{len(entries)} entries over {len(artifacts(entries))} artifacts. "
        "Times are in ms below 10 s and in s above; sizes in MB (10⁶ bytes) below 1 GB."
    )


def sections(report: dict[str, Any]) -> list[Section]:
    """The machine, the settings, then latency, stages, memory and accuracy."""
    entries = report["entries"]
    found = [_machine(report), _settings(report), _latency(entries)]
    if any(entry["stages"] for entry in entries):
        found.append(_stages(report))
    found.append(_memory(report))
    if any(entry["accuracy"] for entry in entries):
        found.append(_accuracy(entries))
    return found


def _machine(report: dict[str, Any]) -> Section:
    machine = report["machine"]
    cpu = machine["cpu"]
    cores = f"{_count(cpu['logical_cores'])} logical cores, {_count(cpu['usable_cores'])} usable"
    libraries = joined(f"{name} {version}" for name, version in machine["libraries"].items())
    items = (
        f"CPU: {cpu['model']} ({cores})",
        f"features: {_features(cpu['features'])}",
        f"threads used: {threads(report)}",
        f"platform: {machine['platform']} ({machine['machine']}), Python {machine['python']}",
        f"libraries: {libraries or MISSING}",
        f"fingerprint: {machine['fingerprint']}",
    )
    return Section("Machine", items=items)


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _features(features: Sequence[str]) -> str:
    avx512 = "yes" if any(name.startswith("avx512") for name in features) else "no"
    amx = "yes" if any(name.startswith("amx") for name in features) else "no"
    listed = joined(features) if features else "none detected"
    return f"{listed} (AVX-512: {avx512}, AMX: {amx})"


def _settings(report: dict[str, Any]) -> Section:
    settings = report["settings"]
    if settings["duration_s"] is not None:
        timing = f"timed: {fixed(settings['duration_s'])} s budget per batch size"
    else:
        timing = f"timed runs: {settings['runs']} per batch size"
    isolation = "each artifact in its own process" if settings["isolate"] else "one process"
    runtime = settings["runtime"] or "each artifact's own"
    items = [
        timing,
        f"warmup: {settings['warmup']} untimed runs",
        f"batch sizes: {joined(settings['batch_sizes'])}",
        f"isolation: {isolation}",
        f"runtime: {runtime}",
    ]
    if any(entry["stages"] for entry in report["entries"]):
        items.append(f"diffusion steps: {settings['steps']}")
    if settings["data"]:
        items.append(f"accuracy data: {settings['data']}")
    if settings["prompts"]:
        items.append(f"prompts: {len(settings['prompts'])}")
    return Section("Settings", items=tuple(items))


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


def _latency(entries: Sequence[Entry]) -> Section:
    intro = "One call at the given batch size (for diffusion models, one whole generation)."
    if not entries:
        return Section("Latency", intro=intro, note="No entries.")
    first = baselines(entries)
    rows = tuple(
        _latency_row(label, entry, first[entry["task"], entry["batch_size"]])
        for label, group in artifacts(entries)
        for entry in group
    )
    table = Table(LATENCY_HEADER, rows, left=2)
    return Section(
        "Latency", intro=intro, table=table, note=_baseline_note(entries), plots="latency"
    )


def _latency_row(label: str, entry: Entry, baseline: Entry) -> tuple[str, ...]:
    latency = entry["latency"]
    return (
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
    )


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


def _stages(report: dict[str, Any]) -> Section:
    entries = [entry for entry in report["entries"] if entry["stages"]]
    names = list(dict.fromkeys(name for entry in entries for name in entry["stages"]))
    header = (
        "artifact",
        "batch",
        *(f"{stage_label(name)} p50" for name in names),
        "images/s",
    )
    rows = tuple(
        (label, str(entry["batch_size"]), *_stage_cells(entry, names), _images_per_s(entry))
        for label, group in artifacts(entries)
        for entry in group
    )
    note = (
        f"p50 of one call of each stage; the UNet or transformer runs once per denoising step "
        f"({report['settings']['steps']} steps per image)."
    )
    return Section("Diffusion stages", table=Table(header, rows), note=note, plots="stages")


def stage_label(name: str) -> str:
    return STAGE_LABELS.get(name, name.replace("_", " "))


def _stage_cells(entry: Entry, names: Sequence[str]) -> list[str]:
    stages = entry["stages"]
    return [seconds(stages[name]["p50_s"]) if name in stages else MISSING for name in names]


def _images_per_s(entry: Entry) -> str:
    value = entry["images_per_s"]
    return MISSING if value is None else fixed(value)


def _memory(report: dict[str, Any]) -> Section:
    header = ("artifact", "runtime", "format", "peak RSS", "size on disk")
    rows = tuple(
        (
            label,
            group[0]["runtime"],
            group[0]["format"],
            size(_peak_rss(group)),
            size(group[0]["size_bytes"]),
        )
        for label, group in artifacts(report["entries"])
    )
    note = "Peak RSS is the measuring process's, the largest over the artifact's batch sizes."
    if not report["settings"]["isolate"]:
        note += " Measured without isolation: it includes every artifact measured before."
    return Section("Memory and size", table=Table(header, rows, left=3), note=note, plots="size")


def _peak_rss(group: Sequence[Entry]) -> int | None:
    measured = [entry["peak_rss_bytes"] for entry in group if entry["peak_rss_bytes"] is not None]
    return max(measured) if measured else None


Column = tuple[str, str, Callable[[Any], str]]
# (header, accuracy field, format): a column appears when some artifact has the field.
ACCURACY_COLUMNS: tuple[Column, ...] = (
    ("images", "images", str),
    ("top-1", "top1", percent),
    ("top-5", "top5", percent),
    ("agreement", "reference_top1_agreement", percent),
    ("cosine", "reference_cosine", lambda value: f"{value:.5f}"),
    ("PSNR", "psnr_db", lambda values: joined(psnr(value) for value in values)),
    ("SSIM", "ssim", lambda values: joined(f"{value:.4f}" for value in values)),
)


def _accuracy(entries: Sequence[Entry]) -> Section:
    measured = [(label, accuracy_of(group)) for label, group in artifacts(entries)]
    columns = [
        column
        for column in ACCURACY_COLUMNS
        if any(accuracy and accuracy.get(column[1]) not in (None, []) for _, accuracy in measured)
    ]
    header = ("artifact", "metric", "score", *(title for title, _, _ in columns))
    rows = tuple((label, *_accuracy_cells(accuracy, columns)) for label, accuracy in measured)
    note = "Higher is better; a PSNR of identical images (infinite) reads 'identical'."
    return Section("Accuracy", table=Table(header, rows, left=2), note=note, plots="accuracy")


def _accuracy_cells(accuracy: dict[str, Any] | None, columns: Sequence[Column]) -> list[str]:
    if accuracy is None:
        return [MISSING] * (2 + len(columns))
    cells = [accuracy["metric"], score(accuracy)]
    for _, field, show in columns:
        value = accuracy.get(field)
        cells.append(MISSING if value in (None, []) else show(value))
    return cells
