"""The bench report on disk: report.json (the schema's contract), report.md, the PNG plots and
report.html (tables and plots on one self-contained page).

report.json is the measurement; the rest are views of it that can always be regenerated. So
report.json is written first, and every file goes to a temporary name in the output folder
before it is renamed into place (outputs.py): a crash never leaves half a file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelkiln.bench.figures import png_bytes
from modelkiln.bench.html_report import page
from modelkiln.bench.plots import KINDS, Plot, draw, report_plots
from modelkiln.bench.schema import validate_report
from modelkiln.bench.sections import TITLE, Section, Table, sections, summary
from modelkiln.outputs import write_file_atomic

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
HTML_NAME = "report.html"
# Every plot name this module writes or once wrote (latency.png, accuracy_vs_latency.png and
# size.png before plots were split by task): what an earlier run may have left here.
PLOT_FILE = re.compile(
    r"(?:(?:latency|stages)-[a-z0-9-]+-b\d+|(?:accuracy|size)-[a-z0-9-]+"
    r"|latency|accuracy_vs_latency|size)\.png"
)


@dataclass(frozen=True)
class ReportFiles:
    """What write_report wrote: the three documents and the plots by kind (plots.KINDS, in
    that order; a kind without plots is absent)."""

    json: Path
    markdown: Path
    html: Path
    plots: Mapping[str, tuple[Path, ...]]

    def paths(self) -> list[Path]:
        """Every file written, documents first."""
        plots = [path for paths in self.plots.values() for path in paths]
        return [self.json, self.markdown, self.html, *plots]


def write_report(report: dict[str, Any], outdir: Path) -> ReportFiles:
    """Validate `report`, then write report.json, report.md, the plots and report.html into
    `outdir`, and remove the plots of an earlier report there that this one does not have.

    An invalid report raises ReportError before anything is written. Without matplotlib,
    report.json and report.md are written and then BackendUnavailableError is raised: the
    measurements are never lost to a missing plot library.
    """
    validate_report(report)
    outdir = Path(outdir)
    json_path, markdown_path = outdir / JSON_NAME, outdir / MARKDOWN_NAME
    write_file_atomic(json_path, (json.dumps(report, indent=2) + "\n").encode())
    write_file_atomic(markdown_path, markdown(report).encode())
    drawn = [(plot, png_bytes(draw(report, plot))) for plot in report_plots(report)]
    plots: dict[str, tuple[Path, ...]] = {}
    for plot, png in drawn:
        write_file_atomic(outdir / plot.name, png)
        plots[plot.kind] = (*plots.get(plot.kind, ()), outdir / plot.name)
    _remove_stale_plots(outdir, {plot.name for plot, _ in drawn})
    html_path = outdir / HTML_NAME
    write_file_atomic(html_path, page(report, drawn).encode())
    ordered = {kind: plots[kind] for kind in KINDS if kind in plots}
    return ReportFiles(json_path, markdown_path, html_path, ordered)


def _remove_stale_plots(outdir: Path, written: set[str]) -> None:
    # A plot left over from an earlier run here would contradict this report.
    for path in outdir.iterdir():
        if PLOT_FILE.fullmatch(path.name) and path.name not in written and path.is_file():
            path.unlink(missing_ok=True)


def markdown(report: dict[str, Any]) -> str:
    """report.md: the machine, the settings, the latency, stages, memory and accuracy tables,
    then the plots by file name."""
    parts = [
        f"# {TITLE}\n\n{summary(report)}",
        *(_markdown_section(section) for section in sections(report)),
    ]
    plots = report_plots(report)
    if plots:
        parts.append(_plots_section(plots))
    return "\n\n".join(parts) + "\n"


def _markdown_section(section: Section) -> str:
    parts = [section.intro] if section.intro else []
    if section.items:
        parts.append("\n".join(f"- {item}" for item in section.items))
    if section.table is not None:
        parts.append(_markdown_table(section.table))
    if section.note:
        parts.append(section.note)
    return f"## {section.title}\n\n" + "\n\n".join(parts)


def _markdown_table(table: Table) -> str:
    """The first `table.left` columns left-aligned text, the others right-aligned numbers."""
    rule = [":--" if column < table.left else "--:" for column in range(len(table.header))]
    lines: Iterable[Sequence[str]] = [table.header, rule, *table.rows]
    return "\n".join("| " + " | ".join(_cell(cell) for cell in line) + " |" for line in lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _plots_section(plots: Sequence[Plot]) -> str:
    images = "\n\n".join(f"![{plot.title}]({plot.name})" for plot in plots)
    return f"## Plots\n\n{images}\n\nThe same tables and plots on one page: {HTML_NAME}."
