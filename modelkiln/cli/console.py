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
    "--batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per model call: larger is faster, up to what memory holds.",
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


class _Status(SpinnerColumn):
    """A spinner while a step runs, ✓ once it is done, a red ✗ where it failed."""

    def render(self, task: Task) -> Any:
        if task.fields.get("failed"):
            return Text("✗", "bold red")
        return Text("✓", "green") if task.finished else super().render(task)


def printable(text: str) -> str:
    """`text` with what a terminal cannot print (a path's undecodable bytes, which Python
    keeps as lone surrogates) written as escapes: a step's line never breaks the console."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class RichProgress:
    """The library's Progress protocol on a rich progress display (stderr)."""

    def __init__(self, display: RichProgressBar) -> None:
        self.display = display

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        task_id = self.display.add_task(
            printable(description), total=total, counted=total is not None
        )
        try:
            yield lambda n=1: self.display.advance(task_id, n)
        except BaseException:
            # The step stays on screen, marked: the error line below says why it failed.
            self.display.update(task_id, failed=True)
            self.display.stop_task(task_id)
            raise
        self.display.update(task_id, completed=total if total is not None else 1, total=total or 1)
        self.display.stop_task(task_id)


class LineProgress:
    """Progress for logs and pipes: a line per finished (✓) or failed (✗) step, and for a
    counted step that runs long, a line with its count and ETA every LINE_EVERY_S."""

    LINE_EVERY_S = 15.0

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        description = printable(description)
        counter = _LineCounter(description, total, self.LINE_EVERY_S)
        try:
            yield counter.advance
        except BaseException:
            err.print(f"✗ {escape(description)} (failed after {counter.elapsed():.1f} s)")
            raise
        err.print(f"✓ {escape(description)}{counter.summary()} ({counter.elapsed():.1f} s)")


class _LineCounter:
    """A counted step's position, printed as a line now and then (logs have no live bar)."""

    def __init__(self, description: str, total: int | None, every_s: float) -> None:
        self.description, self.total, self.every_s = description, total, every_s
        self.done = 0
        self.started = self.printed = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> str:
        return "" if self.total is None else f" {self.done}/{self.total}"

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        now = time.perf_counter()
        if self.total is None or now - self.printed < self.every_s or self.done >= self.total:
            return
        self.printed = now
        left = self.elapsed() / self.done * (self.total - self.done)
        err.print(
            f"  {escape(self.description)}{self.summary()} ({self.elapsed():.0f} s, "
            f"~{left:.0f} s left)"
        )


def progress_columns() -> tuple[ProgressColumn, ...]:
    """What a step shows on a terminal: its status, name, and for a counted step its bar,
    count and time left."""
    return (
        _Status(),
        TextColumn("{task.description}"),
        _Counted(BarColumn()),  # a step of unknown length shows no bar that cannot advance
        _Counted(MofNCompleteColumn()),  # "12/50" denoising steps
        TimeElapsedColumn(),
        _Counted(TimeRemainingColumn()),  # and their ETA
    )


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
    display = RichProgressBar(*progress_columns(), console=err, transient=False)
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
