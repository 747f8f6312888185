"""`kiln env`, `kiln demo`, `kiln bench`, `kiln compare`: what this machine offers, measuring
artifacts, and gating CI on the measurements."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from modelkiln.cli.console import RUNTIME_OPTION, THREADS_OPTION, cells, err, out, progress_display
from modelkiln.errors import InputError
from modelkiln.outputs import check_writable, write_file_atomic


@click.command()
@click.option("--json", "as_json", is_flag=True)
def env(as_json: bool) -> None:
    """Versions, available runtimes and CPU features (AMX, AVX-512, ...)."""
    from modelkiln.env import environment_report

    report = environment_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    host = report["host"]
    cpu = host["cpu"]
    out.print(
        f"[bold]{cpu['model']}[/], {cpu['usable_cores']} usable of {cpu['logical_cores']} "
        f"cores; python {host['python']} on {host['platform']}"
    )
    out.print(f"CPU features: {', '.join(cpu['features']) or 'none of interest'}")
    runtimes = Table("runtime", "installed", "version", "formats", "pip extra")
    for runtime in report["runtimes"]:
        installed = Text("yes", "green") if runtime["available"] else Text("no", "red")
        if runtime["available"] and runtime.get("cannot_run"):
            installed = Text(f"yes, cannot run here: {runtime['cannot_run']}", "yellow")
        runtimes.add_row(
            *cells(
                runtime["name"],
                installed,
                runtime["version"] or "",
                ", ".join(runtime["formats"]),
                f"modelkiln[{runtime['extra']}]",
            )
        )
    out.print(runtimes)
    if report["openvino_devices"]:
        for device, capabilities in report["openvino_devices"].items():
            out.print(f"OpenVINO {device}: {', '.join(capabilities)}")
    libraries = Table("library", "version")
    for name, version in report["libraries"].items():
        libraries.add_row(*cells(name, version))
    out.print(libraries)


@click.command()
@click.option(
    "-w",
    "--work-dir",
    default=Path("artifacts/demo"),
    show_default=True,
    type=click.Path(path_type=Path),
)
@click.option(
    "--runs", default=100, show_default=True, type=int, help="Timed batch-1 runs per backend."
)
@THREADS_OPTION
def demo(work_dir: Path, runs: int, threads: int | None) -> None:
    """Train (or reuse) a ViT on scikit-learn's digits, build it for every CPU backend, compare."""
    from modelkiln.demo import run_demo

    with progress_display() as progress:
        result = run_demo(work_dir, runs=runs, threads=threads, progress=progress)
    table = Table(
        "backend",
        "profile",
        "top-1",
        "agrees w/ torch",
        "p50 ms",
        "p90 ms",
        "vs torch",
        "MB",
        title=f"digits ViT: {result.test_images} held-out images, batch-1 latency",
    )
    reference = result.reference
    for row in result.rows:
        table.add_row(
            *cells(
                row.backend,
                row.profile,
                f"{row.accuracy:.2f} %",
                f"{row.agreement:.2f} %",
                f"{row.median_ms:.3f}",
                f"{row.p90_ms:.3f}",
                f"{reference.median_ms / row.median_ms:.2f}×",
                f"{row.size_mb:.2f}",
            )
        )
    out.print(table)
    from modelkiln.env import cpu_info

    cpu = cpu_info()
    out.print(
        f"{cpu['model']}, threads: {threads or 'runtime default'}; model: {result.model_dir}; "
        f"artifacts: {work_dir}"
    )
    out.print("[green]every backend is within 0.5 points of PyTorch's accuracy[/]")


# --- bench ----------------------------------------------------------------------------------


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        sizes = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 for size in sizes):
        raise click.BadParameter(f"'{value}': give positive integers separated by commas, e.g. 1,8")
    return sizes


def _read_prompts(path: Path | None) -> tuple[str, ...] | None:
    if path is None:
        return None
    prompts = tuple(
        line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    )
    if not prompts:
        raise InputError(f"--prompts {path} holds no prompts: write one prompt per line")
    return prompts


@click.command()
@click.argument("artifacts", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for report.json, report.md and the plots.",
)
@click.option(
    "--matrix",
    type=click.Path(path_type=Path),
    help="Build (if needed) and bench the sources x profiles of this TOML file.",
)
@RUNTIME_OPTION
@click.option(
    "--batch-size",
    "batch_sizes",
    callback=_batch_sizes,
    help="Batch sizes, comma-separated.  [default: 1]",
)
@click.option("--warmup", type=click.IntRange(min=0), help="Untimed calls first.  [default: 3]")
@click.option(
    "--runs", type=click.IntRange(min=1), help="Timed calls per batch size.  [default: 20]"
)
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds of timed calls per batch size, instead of --runs.",
)
@THREADS_OPTION
@click.option("--data", help='Image folder (ImageFolder layout: top-1/top-5) or "digits".')
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Diffusion: a text file, one prompt per line (PSNR/SSIM vs torch fp32).",
)
@click.option(
    "--steps", type=click.IntRange(min=1), help="Denoising steps per image.  [default: 4]"
)
@click.option(
    "--isolate/--no-isolate",
    default=None,
    help="Measure each artifact in its own process (own memory and threads).  [default: isolate]",
)
@click.option("--reference", help="Load the torch reference from here instead of the source.")
@click.option("--no-reference", is_flag=True, help="Skip the torch reference (no agreement).")
def bench(
    artifacts: tuple[Path, ...],
    output: Path,
    matrix: Path | None,
    runtime: str | None,
    batch_sizes: tuple[int, ...] | None,
    warmup: int | None,
    runs: int | None,
    duration_s: float | None,
    threads: int | None,
    data: str | None,
    prompts_file: Path | None,
    steps: int | None,
    isolate: bool | None,
    reference: str | None,
    no_reference: bool,
) -> None:
    """Measure built artifacts: latency, throughput, memory, size and accuracy.

    Writes OUTPUT/report.json (schema: modelkiln/bench/report.schema.json), report.md and
    PNG plots. Gate CI on it with `kiln compare BASELINE.json CURRENT.json`.
    """
    from modelkiln.bench.harness import run
    from modelkiln.bench.matrix import build_matrix, read_matrix
    from modelkiln.bench.settings import BenchSettings

    if bool(artifacts) == bool(matrix):
        raise click.UsageError("give artifact directories or --matrix FILE (one of the two)")
    given: dict[str, Any] = {
        "batch_sizes": batch_sizes,
        "warmup": warmup,
        "runs": runs,
        "duration_s": duration_s,
        "threads": threads,
        "runtime": runtime,
        "data": data,
        "prompts": _read_prompts(prompts_file),
        "steps": steps,
        "isolate": isolate,
        "reference": reference,
        "use_reference": False if no_reference else None,
    }
    chosen = {key: value for key, value in given.items() if value is not None}
    with progress_display() as progress:
        if matrix is not None:
            grid = read_matrix(matrix)
            chosen = {**grid.bench, **chosen}
            artifacts = tuple(build_matrix(grid, progress))
        settings = BenchSettings(**chosen)
        report = run(artifacts, settings, output=output, progress=progress)
    _print_bench(report)
    out.print(f"report: {output / 'report.json'}, {output / 'report.md'} and plots in {output}")


def _print_bench(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['machine']['cpu']['model']}")
    for column in (
        "artifact",
        "runtime",
        "batch",
        "p50",
        "p90",
        "p99",
        "throughput",
        "peak RSS",
        "size",
        "accuracy",
    ):
        left = column in ("artifact", "runtime")
        # Artifact names are what the reader looks for: wrap them rather than cut them.
        table.add_column(column, justify="left" if left else "right", overflow="fold")
    for entry in report["entries"]:
        latency = entry["latency"]
        accuracy = entry["accuracy"]
        score = "—"
        if accuracy is not None:
            value = accuracy["score"]
            unit = " dB" if accuracy["metric"] == "psnr_db" else " %"
            score = "identical" if value is None else f"{value:.2f}{unit} ({accuracy['metric']})"
        rss = entry["peak_rss_bytes"]
        table.add_row(
            *cells(
                entry["name"],
                entry["runtime"],
                str(entry["batch_size"]),
                *(f"{1e3 * latency[k]:.1f} ms" for k in ("p50_s", "p90_s", "p99_s")),
                f"{entry['throughput_per_s']:.1f}/s",
                "—" if rss is None else f"{rss / 1e6:.0f} MB",
                f"{entry['size_bytes'] / 1e6:.1f} MB",
                score,
            )
        )
    out.print(table)


# --- compare --------------------------------------------------------------------------------


class Percent(click.ParamType):
    """'10%' or '10' -> 0.10: the bounds of kiln compare."""

    name = "percent"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):  # already converted (click may convert twice)
            return value
        text = str(value).strip()
        try:
            number = float(text.removesuffix("%").strip())
        except ValueError:
            self.fail(f"{value!r} is not a percentage (write e.g. 10% or 10)", param, ctx)
        if not number >= 0 or number == float("inf"):
            self.fail(f"{value!r} must be a finite percentage >= 0", param, ctx)
        return number / 100


STATUS_STYLES = {
    "regressed": "bold red",
    "improved": "green",
    "noise": "yellow",
    "not comparable": "dim",
    "new": "cyan",
    "missing": "magenta",
}


@click.command()
@click.argument("baseline", type=click.Path(path_type=Path))
@click.argument("current", type=click.Path(path_type=Path))
@click.option(
    "--max-latency-regression",
    type=Percent(),
    default="10%",
    show_default=True,
    help="p50 latency growth allowed.",
)
@click.option(
    "--max-throughput-drop", type=Percent(), default="10%", show_default=True, help="Drop allowed."
)
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Score drop allowed: percentage points (dB for PSNR).",
)
@click.option(
    "--max-memory-growth", type=Percent(), default="20%", show_default=True, help="Peak RSS growth."
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.05,
    show_default=True,
    help="Significance level of the latency test (one-sided Mann-Whitney U).",
)
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="Write JUnit XML.")
@click.option(
    "--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Write a Markdown summary."
)
@click.option(
    "--allow-different-machine", is_flag=True, help="Compare reports from different machines."
)
def compare(
    baseline: Path,
    current: Path,
    max_latency_regression: float,
    max_throughput_drop: float,
    max_accuracy_drop: float,
    max_memory_growth: float,
    alpha: float,
    junit: Path | None,
    markdown: Path | None,
    allow_different_machine: bool,
) -> None:
    """Compare CURRENT bench report with BASELINE: exit 1 on a regression, 2 on unusable input."""
    from modelkiln.bench.compare import compare_files
    from modelkiln.bench.comparison import COLUMNS, Bounds
    from modelkiln.errors import ReportError

    bounds = Bounds(
        max_latency_regression=max_latency_regression,
        max_throughput_drop=max_throughput_drop,
        max_accuracy_drop=max_accuracy_drop,
        max_memory_growth=max_memory_growth,
        alpha=alpha,
    )
    for path in (junit, markdown):
        if path is not None:
            check_writable(path, folder=False)
    try:
        comparison = compare_files(
            baseline, current, bounds, allow_different_machine=allow_different_machine
        )
    except ReportError as error:
        # Unusable input is not a regression: CI tells the two apart by exit code.
        err.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    if comparison.different_machine:
        err.print(f"[yellow]warning:[/] {escape(comparison.machine_warning)}", soft_wrap=True)
    # One table per entry key, the key as its title: a key column would take half the width.
    by_key: dict[str, list[Any]] = {}
    for row in comparison.compared:
        by_key.setdefault(row.key, []).append(row)
    for key, rows in by_key.items():
        table = Table(*COLUMNS, title=Text(key, "bold"), title_justify="left")
        for row in rows:
            *texts, status, note = row.cells()
            styled = Text(status, STATUS_STYLES.get(status, ""))
            table.add_row(*cells(*texts, styled, note))
        out.print(table)
    for label, keys, style in (
        ("new (only in current)", comparison.new, "cyan"),
        ("missing (only in baseline)", comparison.missing, "magenta"),
    ):
        for key in keys:
            out.print(Text.assemble((label, style), f": {key}"))
    for path, write in (
        (junit, comparison.write_junit),
        (markdown, lambda p: write_file_atomic(p, comparison.to_markdown().encode("utf-8"))),
    ):
        if path is not None:
            write(path)
            out.print(f"[green]wrote[/] {escape(str(path))}")
    style = "bold red" if comparison.failed else "bold green"
    out.print(Text(comparison.verdict, style))
    if comparison.failed:
        sys.exit(1)
