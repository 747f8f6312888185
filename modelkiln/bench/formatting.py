"""Grouping and number formatting shared by the report's tables (report.py) and plots
(plots.py): both are views of report.json's entries."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

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


def decimals(value: float) -> int:
    # Three significant figures from 0.1 up; no exponent notation in a table.
    magnitude = abs(value)
    return 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3


def fixed(value: float, digits: int | None = None) -> str:
    return f"{value:.{decimals(value) if digits is None else digits}f}"


def time_scale(seconds: float) -> tuple[float, str]:
    return (1000.0, "ms") if seconds < 10 else (1.0, "s")


def seconds(value: float) -> str:
    """A time for a table: '12.3 ms' below 10 s, '12.0 s' above."""
    scale, unit = time_scale(value)
    return f"{fixed(value * scale)} {unit}"


def size(value: int | None) -> str:
    """Bytes for a table: '400 MB' below 1 GB, '2.50 GB' above (powers of ten)."""
    if value is None:
        return MISSING
    scale, unit = (1e9, "GB") if value >= 1e9 else (1e6, "MB")
    return f"{fixed(value / scale)} {unit}"


def mean_stdev(latency: dict[str, Any]) -> str:
    scale, unit = time_scale(latency["mean_s"])
    mean = latency["mean_s"] * scale
    return f"{fixed(mean)} ± {fixed(latency['stdev_s'] * scale, decimals(mean))} {unit}"


def min_max(latency: dict[str, Any]) -> str:
    scale, unit = time_scale(latency["max_s"])
    return f"{fixed(latency['min_s'] * scale)} – {fixed(latency['max_s'] * scale)} {unit}"


def ratio(entry: Entry, baseline: Entry) -> str:
    # Above 1: this entry is faster than the baseline.
    p50 = entry["latency"]["p50_s"]
    return f"{baseline['latency']['p50_s'] / p50:.2f}×" if p50 > 0 else MISSING


def percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}%"


def psnr(value: float | None) -> str:
    # The schema writes infinite PSNR (identical images) as null.
    return "identical" if value is None else f"{value:.1f} dB"


def score(accuracy: dict[str, Any]) -> str:
    score = accuracy["score"]
    if accuracy["metric"] == "psnr_db":
        return psnr(score)
    return percent(score)


def threads(report: dict[str, Any]) -> str:
    threads = report["settings"]["threads"]
    if threads is not None:
        return f"{threads} threads"
    used = sorted({entry["threads"] for entry in report["entries"] if entry["threads"]})
    listed = f" ({', '.join(map(str, used))})" if used else ""
    return f"threads as each profile says{listed}"


def joined(values: Iterable[object]) -> str:
    return ", ".join(str(value) for value in values)


def accuracy_of(group: Sequence[Entry]) -> dict[str, Any] | None:
    return next((entry["accuracy"] for entry in group if entry["accuracy"]), None)
