"""`kiln env`, `kiln demo`, `kiln bench`, `kiln compare`: what this machine offers, measuring
artifacts, and gating CI on the measurements."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from modelkiln.cli.console import (
    ADDRESS_OPTION,
    BUILD_CACHE_OPTION,
    EXECUTOR_OPTION,
    RUNTIME_OPTION,
    THREADS_OPTION,
    cells,
    out,
    progress_display,
)
from modelkiln.cli.jsonout import JSON_OPTION, emit_json, paths
from modelkiln.errors import InputError


@click.command()
@JSON_OPTION
def env(as_json: bool) -> None:
    """Versions, available runtimes and CPU features (AMX, AVX-512, ...)."""
    from modelkiln.env import environment_report

    report = environment_report()
    if as_json:
        emit_json(report)
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
@JSON_OPTION
def doctor(as_json: bool) -> None:
    """What this machine can build, run and measure, with the pip line for what is missing."""
    from modelkiln.doctor import report

    checks = report()
    if as_json:
        emit_json(checks)
        return
    titles = {"run": "runtimes", "build": "building extras", "cpu": "CPU"}
    for area, title in titles.items():
        table = Table(
            "", "check", "what it means here", "to fix", title=title, title_justify="left"
        )
        for check in (c for c in checks if c["area"] == area):
            mark = Text("✓", "green") if check["ok"] else Text("✗", "red")
            table.add_row(*cells(mark, check["name"], check["detail"], check["fix"]))
        out.print(table)
    failing = sum(not c["ok"] for c in checks)
    out.print(f"{len(checks) - failing} of {len(checks)} checks pass")


@click.command()
@click.option(
    "-w",
    "--work-dir",
    default=Path("artifacts/demo"),
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for the test images and the artifacts built for each backend.",
)
@click.option(
    "--runs",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="Timed batch-1 runs per backend.",
)
@THREADS_OPTION
@JSON_OPTION
def demo(work_dir: Path, runs: int, threads: int | None, as_json: bool) -> None:
    """Train (or reuse) a ViT on scikit-learn's digits, build it for every CPU backend, compare."""
    from modelkiln.demo import run_demo

    with progress_display() as progress:
        result = run_demo(work_dir, runs=runs, threads=threads, progress=progress)
    if as_json:
        emit_json(
            {
                "model": str(result.model_dir),
                "work_dir": str(work_dir),
                "test_images": result.test_images,
                "rows": [asdict(row) for row in result.rows],
            }
        )
        return
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


def batch_sizes_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        sizes = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 for size in sizes):
        raise click.BadParameter(f"'{value}': give positive integers separated by commas, e.g. 1,8")
    return sizes


def read_prompts(path: Path | None) -> tuple[str, ...] | None:
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
    callback=batch_sizes_option,
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
@EXECUTOR_OPTION
@ADDRESS_OPTION
@BUILD_CACHE_OPTION
@JSON_OPTION
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
    executor: str,
    address: str | None,
    cache: str | None,
    as_json: bool,
) -> None:
    """Measure built ARTIFACTS (directories or bundles): latency, throughput, memory, size and
    accuracy.

    Writes OUTPUT/report.json (schema: modelkiln/bench/report.schema.json), report.md,
    report.html and PNG plots. Gate CI on it with `kiln compare BASELINE.json CURRENT.json`.
    """
    from modelkiln.bench.harness import run
    from modelkiln.bench.matrix import plan_builds, read_matrix
    from modelkiln.bench.report import write_report
    from modelkiln.bench.settings import BenchSettings
    from modelkiln.build_cache import open_cache
    from modelkiln.cluster.executors import open_executor
    from modelkiln.outputs import check_writable

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
        "prompts": read_prompts(prompts_file),
        "steps": steps,
        "isolate": isolate,
        "reference": reference,
        "use_reference": False if no_reference else None,
    }
    chosen = {key: value for key, value in given.items() if value is not None}
    grid = read_matrix(matrix) if matrix is not None else None
    build_cache = open_cache(cache)
    check_writable(output, folder=True)  # not after minutes of measuring
    with (
        progress_display() as progress,
        open_executor(executor, address, grid.cluster if grid else None, build_cache) as runner,
    ):
        if grid is not None:
            chosen = {**grid.bench, **chosen}
            artifacts = tuple(runner.build(plan_builds(grid), progress, build_cache))
        settings = BenchSettings(**chosen)
        report = run(artifacts, settings, progress=progress, executor=runner)
    # Written here, not by run(output=...): --json lists the files it wrote.
    written = write_report(report, output)
    if as_json:
        emit_json(
            {
                "report": str(written.json),
                "files": paths(written.paths()),
                "entries": [_entry_summary(entry) for entry in report["entries"]],
            }
        )
        return
    _print_bench(report)
    out.print(f"report: {written.json}, {written.markdown}, {written.html} and plots in {output}")


def _entry_summary(entry: dict[str, Any]) -> dict[str, Any]:
    """What a script reads of one measured entry; report.json holds everything."""
    latency = entry["latency"]
    accuracy = entry["accuracy"]
    return {
        "key": entry["key"],
        "name": entry["name"],
        "artifact": entry["artifact"],
        "profile": entry["profile"],
        "runtime": entry["runtime"],
        "batch_size": entry["batch_size"],
        "p50_s": latency["p50_s"],
        "p90_s": latency["p90_s"],
        "throughput_per_s": entry["throughput_per_s"],
        "peak_rss_bytes": entry["peak_rss_bytes"],
        "size_bytes": entry["size_bytes"],
        "accuracy": None if accuracy is None else {k: accuracy[k] for k in ("metric", "score")},
    }


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
