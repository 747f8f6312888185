"""report.html: report.md's sections and the plots on one page that opens in any browser.

Self-contained on purpose: the plots are data: URIs, the style is inline, there is no script,
and the page's Content-Security-Policy forbids fetching anything, so the file can be mailed,
attached to a CI run or opened offline and always looks the same. Every text is escaped: artifact
names and paths are user text.
"""

from __future__ import annotations

import base64
import html
import struct
from collections.abc import Sequence
from typing import Any

from modelkiln.bench.figures import slug
from modelkiln.bench.plots import Plot
from modelkiln.bench.sections import TITLE, Section, Table, sections, summary

# Nothing but the page's own images and style: a report never phones home.
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { margin: 0; background: #fff; color: #1f2328;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
nav { font-size: 14px; margin: 8px 0 0; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
p.note { color: #57606a; font-size: 13px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; white-space: nowrap; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; margin-top: 12px; }
figure { margin: 0; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 13px; margin-top: 4px; }
"""


def page(report: dict[str, Any], drawn: Sequence[tuple[Plot, bytes]]) -> str:
    """The whole page: title, contents, each section with the plots of its numbers."""
    shown = sections(report)
    by_kind: dict[str, list[tuple[Plot, bytes]]] = {}
    for plot, png in drawn:
        by_kind.setdefault(plot.kind, []).append((plot, png))
    placed = {section.plots for section in shown}
    # Plots whose section a report lacks still appear, at the end.
    rest = [pair for kind, pairs in by_kind.items() if kind not in placed for pair in pairs]
    if rest:
        shown.append(Section("Plots", plots="rest"))
        by_kind["rest"] = rest
    contents = " ".join(
        f'<a href="#{slug(section.title)}">{_text(section.title)}</a>' for section in shown
    )
    body = [
        f"<h1>{_text(TITLE)}</h1>",
        f"<p>{_text(summary(report))}</p>",
        f"<nav>{contents}</nav>",
        *(_section(section, by_kind.get(section.plots, [])) for section in shown),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_text(TITLE)} · {_text(report['created'])}</title>\n"
        f"<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def _text(text: str) -> str:
    return html.escape(text, quote=True)


def _section(section: Section, plots: Sequence[tuple[Plot, bytes]]) -> str:
    parts = [f'<section id="{slug(section.title)}">', f"<h2>{_text(section.title)}</h2>"]
    if section.intro:
        parts.append(f"<p>{_text(section.intro)}</p>")
    if section.items:
        parts.append(
            "<ul>" + "".join(f"<li>{_text(item)}</li>" for item in section.items) + "</ul>"
        )
    if section.table is not None:
        parts.append(_table(section.table))
    if section.note:
        parts.append(f'<p class="note">{_text(section.note)}</p>')
    if plots:
        parts.append('<div class="plots">' + "".join(_figure(*pair) for pair in plots) + "</div>")
    parts.append("</section>")
    return "\n".join(parts)


NUMBER = ' class="num"'


def _table(table: Table) -> str:
    def cells(row: Sequence[str], tag: str) -> str:
        return "".join(
            f"<{tag}{NUMBER if column >= table.left else ''}>{_text(cell)}</{tag}>"
            for column, cell in enumerate(row)
        )

    head = f"<thead><tr>{cells(table.header, 'th')}</tr></thead>"
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in table.rows)
    return f'<div class="scroll"><table>{head}<tbody>{body}</tbody></table></div>'


def _figure(plot: Plot, png: bytes) -> str:
    width, height = png_size(png)
    source = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="{source}" alt="{_text(plot.title)}" width="{width}" '
        f'height="{height}"><figcaption>{_text(plot.title)} ({_text(plot.name)})'
        "</figcaption></figure>"
    )


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header: the page reserves each image's space up front."""
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)
