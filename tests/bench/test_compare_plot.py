"""kiln compare's picture: the entries that moved, baseline to current, one panel per metric."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from matplotlib.collections import PathCollection
from PIL import Image
from reports import entry, report

from modelkiln.bench.compare import LATENCY, Bounds, Comparison, Row, Status, compare_reports
from modelkiln.bench.compare_plot import (
    MAX_ROWS,
    comparison_figure,
    moved_rows,
    write_comparison_plot,
)
from modelkiln.bench.comparison import Machine, accuracy_metric
from modelkiln.errors import InputError

CPU = "Intel(R) Xeon(R) Platinum 8480+"


def moved() -> Comparison:
    """b1 30 % slower (and less throughput), b8 a third faster but 40 % more memory, top-1 one
    point better at b1; a third artifact within its bounds."""
    baseline = report(
        [
            entry(batch_size=1, median_s=0.010),
            entry(batch_size=8, median_s=0.060),
            entry("vit-onnx", 1, 0.030, runtime="onnxruntime"),
        ]
    )
    current = report(
        [
            entry(batch_size=1, median_s=0.013, seed=1, top1=99.5),
            entry(batch_size=8, median_s=0.040, seed=2, peak_rss_bytes=700_000_000),
            entry("vit-onnx", 1, 0.031, runtime="onnxruntime", seed=3),
        ]
    )
    return compare_reports(baseline, current, Bounds())


def ticks(labels: list[object]) -> list[str]:
    return [label.get_text() for label in labels]  # type: ignore[attr-defined]


def test_moved_rows_are_the_regressions_then_the_improvements() -> None:
    rows = moved_rows(moved())
    assert [(row.name.split(" · ")[-1], str(row.metric), row.status) for row in rows] == [
        ("b8", "peak RSS", Status.REGRESSED),  # +40 %
        ("b1", "latency p50", Status.REGRESSED),  # +31 %
        ("b1", "throughput", Status.REGRESSED),  # -23 %
        ("b1", "accuracy top1", Status.IMPROVED),  # +1.00 points
        ("b8", "throughput", Status.IMPROVED),  # +50 %
        ("b8", "latency p50", Status.IMPROVED),  # -33 %
    ]


def test_one_panel_per_metric_that_moved() -> None:
    comparison = moved()
    figure = comparison_figure(comparison)
    figure.draw_without_rendering()
    assert figure.get_suptitle() == (
        "kiln compare: 6 metric(s) moved beyond the bounds (3 regressed, 3 improved)\n"
        f"measured on {CPU}"
    )
    # The panels' axes, then their twins that carry the change labels on the right.
    main, sides = figure.axes[:4], figure.axes[4:]
    assert [axes.get_title(loc="left") for axes in main] == [
        "latency p50 (ms), lower is better",
        "throughput (items/s), higher is better",
        "accuracy top1 (%), higher is better",
        "peak RSS (MB), lower is better",
    ]
    latency, _, _, memory = main
    assert ticks(latency.get_yticklabels()) == [
        "vit-openvino-int8 · vit-openvino-int8 · b1",
        "vit-openvino-int8 · vit-openvino-int8 · b8",
    ]
    assert ticks(sides[0].get_yticklabels()) == ["+30.9% regressed", "-33.4% improved"]
    # Baseline and current of the memory row, in MB; the axis starts at zero.
    points = [c.get_offsets()[0][0] for c in memory.collections if isinstance(c, PathCollection)]
    assert points == pytest.approx([500.0, 700.0])
    assert memory.get_xlim()[0] == 0.0
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [
        "baseline",
        "current: regressed",
        "current: improved",
    ]
    for axes in main:
        assert not legend.get_window_extent().overlaps(axes.get_window_extent())


def test_nothing_moved_is_a_figure_that_says_so() -> None:
    same = report()
    comparison = compare_reports(same, same, Bounds())
    figure = comparison_figure(comparison)
    assert figure.get_suptitle() == f"kiln compare: no entry moved\nmeasured on {CPU}"
    (text,) = figure.axes[0].texts
    assert text.get_text() == "passed: no regression beyond the bounds (2 entries compared)"


def paired_rows(count: int) -> Comparison:
    machine = Machine("0123456789abcdef", CPU, "Linux", "3.12")
    rows = tuple(
        Row(f"k{index}", LATENCY, Status.REGRESSED, 0.010, 0.010 * (1.2 + index / 100), 0.2, 0.1)
        for index in range(count)
    )
    return Comparison(
        machine, Machine("fedcba9876543210", "AMD EPYC", "Linux", "3.12"), Bounds(), rows
    )


def test_many_rows_show_the_largest_and_say_so() -> None:
    figure = comparison_figure(paired_rows(MAX_ROWS + 5))
    assert figure.get_suptitle() == (
        f"kiln compare: {MAX_ROWS + 5} metric(s) moved beyond the bounds "
        f"({MAX_ROWS + 5} regressed, 0 improved); the {MAX_ROWS} largest shown\n"
        f"baseline on {CPU}, current on AMD EPYC"
    )
    assert len(figure.axes[0].get_yticks()) == MAX_ROWS
    # Only what the figure shows is in its legend.
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["baseline", "current: regressed"]


def test_identical_images_have_no_point_but_keep_their_row() -> None:
    machine = Machine("0123456789abcdef", CPU, "Linux", "3.12")
    psnr = accuracy_metric("psnr_db")
    row = Row("k", psnr, Status.REGRESSED, math.inf, 31.4, -math.inf, 0.5, label="sd · b1")
    figure = comparison_figure(Comparison(machine, machine, Bounds(), (row,)))
    axes, side = figure.axes
    dots = [c.get_offsets()[0][0] for c in axes.collections if isinstance(c, PathCollection)]
    assert dots == [31.4]
    assert ticks(axes.get_yticklabels()) == ["sd · b1"]
    assert ticks(side.get_yticklabels()) == ["-inf dB regressed"]


def test_write_comparison_plot_writes_the_same_png_every_time(tmp_path: Path) -> None:
    comparison = moved()
    path = write_comparison_plot(comparison, tmp_path / "compare.png")
    assert path == tmp_path / "compare.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == 1000
        assert "Software" not in image.info
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and (214, 39, 40) in {colour for _, colour in colours}  # red
    again = write_comparison_plot(comparison, str(tmp_path / "again.png"))
    assert again.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "compare.png"]


def test_a_plot_name_other_than_png_is_refused_before_drawing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"PNG image; name it \.png, not 'compare\.svg'"):
        write_comparison_plot(moved(), tmp_path / "compare.svg")
    assert list(tmp_path.iterdir()) == []
