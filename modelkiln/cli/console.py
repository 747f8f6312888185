"""What every kiln command shares: the consoles, progress displays and common options."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgressBar
from rich.text import Text

from modelkiln.errors import InputError
from modelkiln.progress import NullProgress

if TYPE_CHECKING:
    from modelkiln.records import OutputScore

err = Console(stderr=True)
out = Console()

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
RUNTIME_OPTION = click.option("--runtime", help="Run with this runtime instead of the built one.")
THREADS_OPTION = click.option(
    "--threads", type=click.IntRange(min=1), help="Threads for the runtime."
)
DEVICE_OPTION = click.option("--device", help="Device for the runtime (cpu, cuda, gpu, ...).")
BATCH_OPTION = click.option(
    "--batch-size", default=8, show_default=True, type=click.IntRange(min=1)
)
MAX_PIXELS_OPTION = click.option(
    "--max-pixels",
    default=100_000_000,
    show_default=True,
    type=click.IntRange(min=0),
    help="Refuse images with more pixels than this (0: no limit).",
)

BUILD_CACHE_OPTION = click.option(
    "--cache",
    "cache",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[DIR|URL]",
    help="Build cache: restore a build from it when its inputs were built before, store "
    "it when not. A folder or an fsspec URL (s3://...); alone: $MODELKILN_CACHE/builds.",
)
EXECUTOR_OPTION = click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where a matrix's builds and measurements run: here, one after the other, or as "
    "tasks on a Ray cluster (builds side by side, each measurement on a node of its own).",
)
ADDRESS_OPTION = click.option(
    "--address",
    help="With --executor ray: the cluster (HOST:PORT, ray://HOST:10001 or auto).  "
    "[default: RAY_ADDRESS, else a cluster started on this machine]",
)


def cells(*values: str | Text) -> list[Text]:
    """Table cells as plain text: paths and labels may contain [brackets] rich would eat."""
    return [value if isinstance(value, Text) else Text(value) for value in values]


class _Counted(ProgressColumn):
    """A column shown for tasks that count steps; spinner tasks leave it blank."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task: Task) -> Any:
        return self.column.render(task) if task.fields.get("counted") else Text("")


class RichProgress:
    """The library's Progress protocol on a rich progress display (stderr)."""

    def __init__(self, display: RichProgressBar) -> None:
        self.display = display

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        task_id = self.display.add_task(description, total=total, counted=total is not None)
        try:
            yield lambda n=1: self.display.advance(task_id, n)
        except BaseException:
            # The error line says what failed; a frozen spinner above it would only repeat it.
            self.display.remove_task(task_id)
            raise
        self.display.update(task_id, completed=total if total is not None else 1, total=total or 1)
        self.display.stop_task(task_id)


class LineProgress:
    """Progress for logs and pipes: one line per finished step, none for a failed one."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        started = time.perf_counter()
        yield lambda n=1: None
        err.print(f"✓ {escape(description)} ({time.perf_counter() - started:.1f} s)")


@contextlib.contextmanager
def progress_display() -> Iterator[RichProgress | LineProgress | NullProgress]:
    """Live bars on a terminal; plain lines where stderr is a file or a pipe (CI logs);
    nothing with `kiln -q`."""
    context = click.get_current_context(silent=True)
    if context is not None and context.find_root().params.get("quiet"):
        yield NullProgress()
        return
    if not err.is_terminal:
        yield LineProgress()
        return
    display = RichProgressBar(
        SpinnerColumn(finished_text="[green]✓[/]"),
        TextColumn("{task.description}"),
        BarColumn(),
        _Counted(MofNCompleteColumn()),  # "12/50" denoising steps
        TimeElapsedColumn(),
        _Counted(TimeRemainingColumn()),  # and their ETA
        console=err,
        transient=False,
    )
    with display:
        yield RichProgress(display)


def expand_images(images: Sequence[str]) -> list[str]:
    """Files as given; directories replaced by the image files under them, sorted."""
    expanded: list[str] = []
    for item in images:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                str(p)
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise InputError(f"directory '{item}' holds no image files")
            expanded += found
        else:
            expanded.append(item)
    return expanded


def describe_scores(
    outputs: Mapping[str, OutputScore], *, full: bool = False, sep: str = ", "
) -> str:
    """Each output's score against its reference, as the build and `kiln validate` print it;
    `full` adds SQNR and top-1 agreement (kiln info)."""
    lines = []
    for name, score in outputs.items():
        text = f"{name}: max-abs {score.max_abs:.2e}, cosine {score.min_cosine:.6f}"
        if full and score.sqnr_db is not None:
            text += f", SQNR {score.sqnr_db:.1f} dB"
        if full and score.top1_agreement is not None:
            text += f", top-1 {score.top1_agreement:.3f}"
        lines.append(text)
    return sep.join(lines)
