"""report.html: self-contained, escaped, and rendered by a real browser (headless Chromium)
with every plot loaded."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from reports import entry, full_report, hand_set, report

from modelkiln.bench.html_report import POLICY
from modelkiln.bench.report import ReportFiles, write_report

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (apt-get install chromium; `make test` installs it "
    "where it can): the page is not rendered",
)
# A browser that starts cold on a busy CI machine can take a while; it never needs minutes.
TIMEOUT_S = 120
WINDOW = (1280, 2000)
# matplotlib's first two colours: the bars of the first two artifacts in every latency plot.
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)


def rich_report() -> dict[str, Any]:
    """Classifiers at batch 1 and 8 (four scored: a Pareto front and a dominated one), an SD
    generation with its stages and PSNR."""
    measured = full_report()
    scored = dict(measured["entries"][0]["accuracy"], score=98.6, top1=98.6)
    measured["entries"][2]["accuracy"] = scored
    more = [
        hand_set(
            "vit-onnxruntime-int8", 1, [0.0079, 0.0080, 0.0084], runtime="onnxruntime", top1=97.2
        ),
        entry("vit-onnxruntime-int8", 8, 0.045, runtime="onnxruntime", top1=97.2, seed=3),
        hand_set("vit-torch-fp32", 1, [0.039, 0.040, 0.043], runtime="torch", top1=98.6),
        entry("vit-torch-fp32", 8, 0.31, runtime="torch", top1=98.6, seed=4),
    ]
    measured["entries"][4:4] = more
    return measured


class Page(HTMLParser):
    """The tags of a page: every start tag's name and attributes, in order."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    return write_report(rich_report(), tmp_path_factory.mktemp("html"))


def chromium(*arguments: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *arguments,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


# ------------------------------------------------------------------------- the page itself


def test_every_plot_is_embedded_once_as_written(written: ReportFiles) -> None:
    page = Page(written.html.read_text(encoding="utf-8"))
    images = page.all("img")
    plots = [path for paths in written.plots.values() for path in paths]
    assert len(images) == len(plots) == 8
    prefix = "data:image/png;base64,"
    embedded = []
    for image in images:
        source = image["src"] or ""
        assert source.startswith(prefix)
        embedded.append(base64.b64decode(source.removeprefix(prefix)))
    assert sorted(embedded) == sorted(path.read_bytes() for path in plots)
    with Image.open(plots[0]) as first:
        assert (images[0]["width"], images[0]["height"]) == (str(first.width), str(first.height))


def test_the_page_fetches_nothing_and_runs_nothing(written: ReportFiles) -> None:
    text = written.html.read_text(encoding="utf-8")
    page = Page(text)
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    (policy,) = [m for m in page.all("meta") if m.get("http-equiv") == "Content-Security-Policy"]
    assert (
        policy["content"]
        == POLICY
        == ("default-src 'none'; img-src data:; style-src 'unsafe-inline'")
    )
    assert [a["href"] for a in page.all("a")] == [
        "#machine",
        "#settings",
        "#latency",
        "#diffusion-stages",
        "#memory-and-size",
        "#accuracy",
    ]
    assert not re.search(r"(?:src|href)=\"(?!data:|#)", text)


def test_plots_sit_in_the_section_of_their_numbers(written: ReportFiles) -> None:
    text = written.html.read_text(encoding="utf-8")
    sections = dict(re.findall(r'<section id="([a-z-]+)">(.*?)</section>', text, re.DOTALL))
    captions = {
        key: re.findall(r"\(([a-z0-9-]+\.png)\)</figcaption>", body)
        for key, body in sections.items()
    }
    assert captions == {
        "machine": [],
        "settings": [],
        "latency": [
            "latency-image-classification-b1.png",
            "latency-image-classification-b8.png",
            "latency-text-to-image-b1.png",
        ],
        "diffusion-stages": ["stages-text-to-image-b1.png"],
        "memory-and-size": ["size-image-classification.png", "size-text-to-image.png"],
        "accuracy": [
            "accuracy-image-classification-top1.png",
            "accuracy-text-to-image-psnr-db.png",
        ],
    }
    # The tables are report.md's: the same cells.
    assert '<td>vit-torch-fp32</td><td>torch</td><td class="num">1</td>' in text
    assert '<td class="num">40.0 ms</td>' in text


def test_user_text_is_escaped(tmp_path: Path) -> None:
    odd = entry("x")
    odd["name"] = odd["artifact"] = '<img src="http://x/y.png"> & "co"'
    measured = report([odd])
    measured["machine"]["cpu"]["model"] = "<script>alert(1)</script>"
    text = write_report(measured, tmp_path).html.read_text(encoding="utf-8")
    assert "<script>" not in text and '<img src="http' not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&lt;img src=&quot;http://x/y.png&quot;&gt; &amp; &quot;co&quot;" in text


# --------------------------------------------------------------------------------- rendered


@needs_chromium
def test_chromium_renders_the_page(written: ReportFiles, tmp_path: Path) -> None:
    screenshot = tmp_path / "report.png"
    chromium(
        f"--screenshot={screenshot}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        written.html.as_uri(),
        profile=tmp_path / "profile",
    )
    with Image.open(screenshot) as image:
        assert image.size == WINDOW
        pixels = image.convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "the page is (nearly) blank"
    counts = {colour: count for count, colour in colours}
    white = counts.get((255, 255, 255), 0)
    assert white < 0.9 * WINDOW[0] * WINDOW[1]
    # The first latency plot's bars are on screen: the images were decoded and drawn.
    assert counts.get(BLUE, 0) > 2000 and counts.get(ORANGE, 0) > 2000


@needs_chromium
def test_chromium_loads_every_plot(written: ReportFiles, tmp_path: Path) -> None:
    """A copy of the page reports each image's decoded width into the DOM once loaded; the
    copy's policy allows that one inline script and keeps the page's image rule."""
    text = written.html.read_text(encoding="utf-8")
    probe = (
        "<script>window.addEventListener('load', () => {"
        "document.body.dataset.widths = Array.from(document.images, "
        "(image) => image.complete ? image.naturalWidth : -1).join(',');});</script>"
    )
    copy = tmp_path / "probe.html"
    copy.write_text(
        text.replace(POLICY, POLICY + "; script-src 'unsafe-inline'").replace(
            "</body>", probe + "</body>"
        ),
        encoding="utf-8",
    )
    dom = chromium(
        "--dump-dom", "--virtual-time-budget=10000", copy.as_uri(), profile=tmp_path / "profile"
    ).stdout
    found = re.search(r'data-widths="([-0-9,]*)"', dom)
    assert found, "the page never finished loading"
    widths = [int(width) for width in found.group(1).split(",")]
    expected = [int(image["width"] or 0) for image in Page(text).all("img")]
    assert widths == expected and len(widths) == 8
    assert all(width == 800 for width in widths)
