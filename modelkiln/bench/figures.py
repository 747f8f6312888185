"""What every bench figure shares: matplotlib's object API only (no pyplot), so nothing touches
global state; fixed pixels and no "Software" tag, so the same numbers give byte-identical PNGs.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from modelkiln.errors import missing_backend

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

WIDTH = 8.0
DPI = 100
# An axis spanning more than this ratio is drawn on a log scale.
LOG_SPAN = 30.0
FONT = 8


def new_figure(height: float, width: float = WIDTH) -> Figure:
    """An empty figure of fixed size whose layout keeps titles, labels and legends apart."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise missing_backend("matplotlib", "bench") from error
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def titled_axes(figure: Figure, title: str, machine: str) -> Axes:
    """The one axes of a report figure: what it shows above, where it was measured below."""
    figure.suptitle(plain(title))
    axes = figure.add_subplot()
    axes.set_title(plain(machine), fontsize=FONT, color="0.35")
    return axes


def plain(text: str) -> str:
    # Names are user text: a '$' pair would otherwise turn on matplotlib's mathtext.
    return text.replace("$", r"\$")


def log_if_wide(axes: Axes, values: Sequence[float], axis: str) -> bool:
    """A log scale on `axis` when the positive values span more than LOG_SPAN; whether set."""
    positive = [value for value in values if value > 0]
    if not positive or max(positive) / min(positive) <= LOG_SPAN:
        return False
    if axis == "y":
        axes.set_yscale("log")
    else:
        axes.set_xscale("log")
    return True


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG: the same figure always gives the same bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def slug(text: str) -> str:
    """A file-name part: lower case letters, digits and single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"
