"""`kiln compare`: the regression gate, on two stored bench reports or (--rerun) on two
artifacts timed paired now."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from modelkiln.cli.console import RUNTIME_OPTION, THREADS_OPTION, cells, err, out, progress_display
from modelkiln.cli.exit_codes import CHECK_FAILED, USER_ERROR
from modelkiln.cli.jsonout import JSON_OPTION, emit_json, paths
from modelkiln.cli.measure import batch_sizes_option
from modelkiln.outputs import check_writable, write_file_atomic

if TYPE_CHECKING:
    from modelkiln.bench.comparison import Comparison


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
    help="Significance level of the latency test (one-sided Mann-Whitney U; with --rerun, "
    "the paired ratio's bootstrap interval).",
)
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="Write JUnit XML.")
@click.option(
    "--markdown", type=click.Path(dir_okay=False, path_type=Path), help="Write a Markdown summary."
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a before/after PNG of the entries that moved (regressed or improved).",
)
@click.option(
    "--allow-different-machine", is_flag=True, help="Compare reports from different machines."
)
@click.option(
    "--allow-missing",
    is_flag=True,
    help="Pass entries missing from CURRENT and metrics not comparable (absent, NaN) instead "
    "of failing on them.",
)
@click.option(
    "--normalise",
    is_flag=True,
    help="Divide CURRENT's timings by the host's drift between the reports (the calibration "
    "workload each report timed).",
)
@click.option(
    "--rerun",
    is_flag=True,
    help="BASELINE and CURRENT are artifacts (or bundles): time both now, alternating in short "
    "blocks in one process, and gate on the paired latency ratio (what a shared CI runner "
    "needs: the host's drift hits both sides alike).",
)
@click.option(
    "--rounds",
    type=click.IntRange(3, 10_000),
    default=20,
    show_default=True,
    help="--rerun: blocks timed per side.",
)
@click.option(
    "--block",
    type=click.IntRange(1, 10_000),
    default=3,
    show_default=True,
    help="--rerun: calls per block (their median is the block's time).",
)
@click.option(
    "--batch-size",
    "batch_sizes",
    callback=batch_sizes_option,
    help="--rerun: batch sizes, comma-separated.  [default: 1]",
)
@click.option(
    "--steps", type=click.IntRange(min=1), help="--rerun, diffusion: steps.  [default: 4]"
)
@RUNTIME_OPTION
@THREADS_OPTION
@JSON_OPTION
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
    plot: Path | None,
    allow_different_machine: bool,
    allow_missing: bool,
    normalise: bool,
    rerun: bool,
    rounds: int,
    block: int,
    batch_sizes: tuple[int, ...] | None,
    steps: int | None,
    runtime: str | None,
    threads: int | None,
    as_json: bool,
) -> None:
    """Compare CURRENT bench report with BASELINE (or, with --rerun, time the two artifacts
    paired): exit 1 on a regression or something not measured, 2 on unusable input."""
    from modelkiln.bench.comparison import Bounds
    from modelkiln.errors import ReportError

    bounds = Bounds(
        max_latency_regression=max_latency_regression,
        max_throughput_drop=max_throughput_drop,
        max_accuracy_drop=max_accuracy_drop,
        max_memory_growth=max_memory_growth,
        alpha=alpha,
    )
    if plot is not None and plot.suffix.lower() != ".png":
        raise click.BadParameter(f"'{plot}': the plot is a PNG; name it *.png", param_hint="--plot")
    for path in (junit, markdown, plot):
        if path is not None:
            check_writable(path, folder=False)
    measuring = {"batch_sizes": batch_sizes, "steps": steps, "runtime": runtime, "threads": threads}
    given = click.get_current_context().get_parameter_source
    paired_only = [
        name for name in ("rounds", "block") if given(name) is ParameterSource.COMMANDLINE
    ]
    if not rerun and (paired_only or any(value is not None for value in measuring.values())):
        raise click.UsageError(
            "--batch-size, --steps, --runtime, --threads, --rounds and --block apply to --rerun"
        )
    if rerun and (allow_different_machine or allow_missing or normalise):
        raise click.UsageError(
            "--allow-different-machine, --allow-missing and --normalise apply to stored "
            "reports; --rerun times both artifacts now, on this machine"
        )
    try:
        if rerun:
            comparison = _rerun(baseline, current, bounds, rounds, block, measuring)
        else:
            from modelkiln.bench.compare import compare_files

            comparison = compare_files(
                baseline,
                current,
                bounds,
                allow_different_machine=allow_different_machine,
                allow_missing=allow_missing,
                normalise=normalise,
            )
    except ReportError as error:
        # Unusable input is not a regression: CI tells the two apart by exit code.
        err.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(USER_ERROR)
    if comparison.different_machine:
        err.print(f"[yellow]warning:[/] {escape(comparison.machine_warning)}", soft_wrap=True)
    if comparison.drift is not None:
        err.print(f"host drift: {escape(comparison.drift_note)}", soft_wrap=True)
    if as_json:
        written = _write_summaries(comparison, junit, markdown, plot, say=False)
        emit_json({**comparison.to_json(), "files": paths(written)})
    else:
        _print_rows(comparison)
        _write_summaries(comparison, junit, markdown, plot, say=True)
        style = "bold red" if comparison.failed else "bold green"
        out.print(Text(comparison.verdict, style))
    if comparison.failed:
        sys.exit(CHECK_FAILED)


def _write_summaries(
    comparison: Comparison,
    junit: Path | None,
    markdown: Path | None,
    plot: Path | None,
    *,
    say: bool,
) -> list[Path]:
    """The JUnit, Markdown and plot files asked for, whatever the verdict (CI keeps them)."""
    from modelkiln.bench.compare_plot import write_comparison_plot

    written = []
    for path, write in (
        (junit, comparison.write_junit),
        (markdown, lambda p: write_file_atomic(p, comparison.to_markdown().encode("utf-8"))),
        (plot, lambda p: write_comparison_plot(comparison, p)),
    ):
        if path is not None:
            write(path)
            written.append(path)
            if say:
                out.print(f"[green]wrote[/] {escape(str(path))}")
    return written


def _print_rows(comparison: Comparison) -> None:
    from modelkiln.bench.comparison import COLUMNS

    # One table per entry key, the key as its title: a key column would take half the width.
    by_name: dict[str, list[Any]] = {}
    for row in comparison.compared:
        by_name.setdefault(row.name, []).append(row)
    for name, rows in by_name.items():
        table = Table(*COLUMNS, title=Text(name, "bold"), title_justify="left")
        for row in rows:
            *texts, status, note = row.cells()
            styled = Text(status, STATUS_STYLES.get(status, ""))
            table.add_row(*cells(*texts, styled, note))
        out.print(table)
    for label, status, style in (
        ("new (only in current)", "new", "cyan"),
        ("missing (only in baseline)", "missing", "magenta"),
    ):
        for row in comparison.rows:
            if row.status == status:
                out.print(Text.assemble((label, style), f": {row.name}"))


def _rerun(
    baseline: Path,
    candidate: Path,
    bounds: Any,
    rounds: int,
    block: int,
    measuring: dict[str, Any],
) -> Any:
    """The paired comparison of two artifacts; an unusable one is a ReportError (exit 2)."""
    from modelkiln.bench.paired import PairedSettings, compare_rerun
    from modelkiln.bench.settings import BenchSettings
    from modelkiln.errors import KilnError, ReportError

    settings = BenchSettings(**{k: v for k, v in measuring.items() if v is not None})
    try:
        with progress_display() as progress:
            comparison = compare_rerun(
                baseline, candidate, settings, PairedSettings(rounds, block), bounds, progress
            )
    except ReportError:
        raise
    except KilnError as error:  # a missing or broken artifact: unusable input, not a regression
        raise ReportError(str(error)) from error
    return comparison


@click.group()
def ci() -> None:
    """CI recipes for the regression gate."""


@ci.command("init")
@click.option(
    "--provider",
    type=click.Choice(["github", "gitlab"]),
    default="github",
    show_default=True,
    help="Which CI the file is for.",
)
@click.option("--source", required=True, help="What the job builds: a repository folder or hub id.")
@click.option("-p", "--profile", required=True, help="The profile it builds with.")
@click.option(
    "--baseline",
    required=True,
    help="The last release's artifact: a folder on the runner or a store URL (s3://...).",
)
@click.option(
    "--cache", required=True, help="The build cache every job shares: a store URL (s3://...)."
)
@click.option(
    "--batch-size",
    "batch_sizes",
    default="1,8",
    show_default=True,
    callback=batch_sizes_option,
    help="Batch sizes the gate times, comma-separated.",
)
@click.option(
    "--package",
    default="modelkiln",
    show_default=True,
    help='What pip installs, e.g. "modelkiln @ git+https://github.com/OWNER/modelkiln".',
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The file to write.  [default: .github/workflows/kiln-gate.yml or .gitlab-ci.yml]",
)
@click.option("--force", is_flag=True, help="Replace the file if it exists.")
@JSON_OPTION
def ci_init(
    provider: str,
    source: str,
    profile: str,
    baseline: str,
    cache: str,
    batch_sizes: tuple[int, ...],
    package: str,
    output: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write the CI job: build with the cache, compare --rerun against the baseline, keep the
    JUnit file and the Markdown summary."""
    from modelkiln.ci_recipe import PROVIDERS, Recipe, render
    from modelkiln.errors import InputError

    sizes = ",".join(map(str, batch_sizes))
    text = render(provider, Recipe(source, profile, baseline, cache, sizes, package))
    target = output or Path(PROVIDERS[provider])
    if target.exists() and not force:
        raise InputError(f"{target} exists; add --force to replace it, or -o another file")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(target, text.encode())
    if as_json:
        emit_json({"provider": provider, "files": [str(target)]})
        return
    out.print(f"[green]wrote[/] {escape(str(target))}")
