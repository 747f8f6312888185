"""The report's figures: which exist, what each draws, and that nothing covers the data."""

from __future__ import annotations

from typing import Any

import pytest
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from reports import diffusion_entry, entry, full_report, hand_set, report

from modelkiln.bench.plots import Plot, draw, pareto_front, report_plots, score_limits

CPU = "Intel(R) Xeon(R) Platinum 8480+"


def plots_of(measured: dict[str, Any], kind: str) -> list[Plot]:
    return [plot for plot in report_plots(measured) if plot.kind == kind]


def drawn(measured: dict[str, Any], name: str) -> tuple[Figure, Axes]:
    """The figure of the plot called `name`, laid out as it is saved, and its main axes."""
    (plot,) = [plot for plot in report_plots(measured) if plot.name == name]
    figure = draw(measured, plot)
    figure.draw_without_rendering()
    return figure, figure.axes[0]


def assert_legend_beside(figure: Figure, axes: Axes) -> None:
    """The legend is the figure's, laid out outside the axes: it cannot hide a bar or point."""
    assert axes.get_legend() is None
    (legend,) = figure.legends
    assert not legend.get_window_extent().overlaps(axes.get_window_extent())


def scored_report(scores: list[float]) -> dict[str, Any]:
    """One classifier per score, each slower than the last, measured at batch 1 and 8."""
    entries = []
    for index, score in enumerate(scores):
        name = f"vit-{index}"
        entries += [
            entry(name, 1, 0.010 * (index + 1), top1=score, seed=index),
            entry(name, 8, 0.060 * (index + 1), top1=score, seed=index),
        ]
    return report(entries)


# ------------------------------------------------------------------------------ which plots


def test_one_latency_figure_per_task_and_batch() -> None:
    plots = plots_of(full_report(), "latency")
    assert [(plot.name, plot.title) for plot in plots] == [
        ("latency-image-classification-b1.png", "image-classification · batch 1: latency per call"),
        ("latency-image-classification-b8.png", "image-classification · batch 8: latency per call"),
        ("latency-text-to-image-b1.png", "text-to-image · batch 1: latency per generation"),
    ]
    for plot in plots:
        assert len({(entry["task"], entry["batch_size"]) for _, entry in plot.points}) == 1
    assert [label for label, _ in plots[1].points] == ["vit-openvino-int8", "vit-onnxruntime-fp32"]


def test_stages_accuracy_and_size_plots_follow_task_and_metric() -> None:
    measured = full_report()
    assert [plot.name for plot in plots_of(measured, "stages")] == ["stages-text-to-image-b1.png"]
    accuracy = plots_of(measured, "accuracy")
    assert [plot.name for plot in accuracy] == [
        "accuracy-image-classification-top1.png",
        "accuracy-text-to-image-psnr-db.png",
    ]
    # The scored artifact at its smallest batch; the unscored fp32 artifact is not a point.
    assert [(label, e["batch_size"]) for label, e in accuracy[0].points] == [
        ("vit-openvino-int8", 1)
    ]
    size = plots_of(measured, "size")
    assert [[label for label, _ in plot.points] for plot in size] == [
        ["vit-openvino-int8", "vit-onnxruntime-fp32"],
        ["sd-openvino-int8"],
    ]


def test_task_names_become_safe_file_names() -> None:
    odd = entry()
    odd["task"] = "Zero Shot/../x"
    assert report_plots(report([odd]))[0].name == "latency-zero-shot-x-b1.png"


# ---------------------------------------------------------------------------------- latency


def test_latency_figure_draws_p50_bars_and_p90_p99_whiskers() -> None:
    measured = full_report()
    figure, axes = drawn(measured, "latency-image-classification-b1.png")
    assert figure.get_suptitle() == "image-classification · batch 1: latency per call"
    assert CPU in axes.get_title() and "2 threads" in axes.get_title()
    assert axes.get_xlabel() == "latency per call (ms)"
    assert [tick.get_text() for tick in axes.get_yticklabels()] == [
        "vit-openvino-int8",
        "vit-onnxruntime-fp32",
    ]
    bars = [patch.get_width() for patch in axes.patches]
    assert bars == pytest.approx([12.3, 24.6])  # p50 in ms of the hand-set entries
    p90, p99 = (c.get_offsets()[:, 0] for c in axes.collections if isinstance(c, PathCollection))
    assert list(p90) == pytest.approx([12.46, 24.6])
    assert list(p99) == pytest.approx([12.496, 24.6])
    # The p50 labels sit right of each p99 marker and inside the axes.
    labels = [text.get_text() for text in axes.texts]
    assert labels == ["12.3 ms", "24.6 ms"]
    assert axes.get_xlim()[1] > 24.6 * 1.2
    assert_legend_beside(figure, axes)


def test_a_generation_is_plotted_in_seconds_on_its_own_axis() -> None:
    _, axes = drawn(full_report(), "latency-text-to-image-b1.png")
    assert axes.get_xlabel() == "latency per call (s)"
    assert [tick.get_text() for tick in axes.get_yticklabels()] == ["sd-openvino-int8"]
    assert [patch.get_width() for patch in axes.patches] == pytest.approx([12.0])


def test_each_artifact_keeps_its_colour_in_every_figure() -> None:
    measured = full_report()
    _, latency_axes = drawn(measured, "latency-image-classification-b8.png")
    _, size_axes = drawn(measured, "size-image-classification.png")
    colours = [patch.get_facecolor() for patch in latency_axes.patches]
    assert colours == [patch.get_facecolor() for patch in size_axes.patches]
    assert colours[0] != colours[1]


# ----------------------------------------------------------------------------------- stages


def test_stages_stack_to_the_generation_time() -> None:
    measured = full_report()
    figure, axes = drawn(measured, "stages-text-to-image-b1.png")
    sd = measured["entries"][-1]
    unet = sd["stages"]["unet_step"]
    widths = [patch.get_width() for patch in axes.patches]
    # Per generation: one text encoder call, four UNet steps, one decode, and the rest.
    expected = [0.02, unet["mean_s"] * 4, 1.1]
    assert widths[:3] == pytest.approx(expected)
    assert sum(widths) == pytest.approx(sd["latency"]["mean_s"])  # 12.0 s in all
    assert widths[3] == pytest.approx(12.0 - sum(expected))
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [
        "text encoder × 1",
        "UNet per step × 4",
        "VAE decode × 1",
        "other",
    ]
    assert axes.texts[-1].get_text() == "12.0 s"
    assert_legend_beside(figure, axes)


def test_stages_longer_than_the_generation_leave_no_negative_rest() -> None:
    slow = diffusion_entry()
    slow["stages"]["unet_step"]["mean_s"] = 4.0  # 16 s of UNet in a 12 s generation
    _, axes = drawn(report([slow]), "stages-text-to-image-b1.png")
    widths = [patch.get_width() for patch in axes.patches]
    assert widths[3] == 0.0 and sum(widths) == pytest.approx(0.02 + 16.0 + 1.1)


# --------------------------------------------------------------------------------- accuracy


def test_pareto_front() -> None:
    points = [(10.0, 90.0), (20.0, 95.0), (15.0, 85.0), (30.0, 95.0), (10.0, 90.0)]
    # (15, 85) is slower and worse than (10, 90); (30, 95) slower than (20, 95) and no better.
    assert pareto_front(points) == {0, 1, 4}
    assert pareto_front([(1.0, 50.0)]) == {0}


@pytest.mark.parametrize(
    ("scores", "percent", "expected"),
    [
        # Identical scores: at least 4 points of axis, and never above 100 %.
        ([98.5, 98.5], True, (94.8, 100.0)),
        ([100.0], True, (94.8, 100.0)),
        ([50.0, 60.0], True, (48.5, 61.5)),
        ([1.0], True, (0.0, 3.6)),
        # PSNR is not a percentage: no cap.
        ([31.4], False, (28.8, 34.0)),
    ],
)
def test_score_axis_limits(
    scores: list[float], percent: bool, expected: tuple[float, float]
) -> None:
    assert score_limits(scores, percent=percent) == pytest.approx(expected)


def test_accuracy_figure_marks_the_front_and_keeps_the_axis_sane() -> None:
    # The same score three times: the fastest is the front, the others are dominated.
    measured = scored_report([98.5, 98.5, 97.0])
    figure, axes = drawn(measured, "accuracy-image-classification-top1.png")
    low, high = axes.get_ylim()
    assert high == 100.0 and high - low >= 4.0
    assert axes.get_xlim()[0] == 0.0
    assert axes.get_xlabel() == "p50 latency at batch 1 (ms); left is faster"
    assert axes.get_ylabel() == "top-1 accuracy (%); up is better"
    dots = [c for c in axes.collections if isinstance(c, PathCollection)]
    # A hollow marker has no face colour at all.
    assert [len(dot.get_facecolor()) for dot in dots] == [1, 0, 0]
    assert list(dots[0].get_offsets()[0]) == pytest.approx([10.0, 98.5], 0.05)
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [
        "vit-0",
        "vit-1",
        "vit-2",
        "Pareto front (filled)",
    ]
    assert_legend_beside(figure, axes)


def test_scores_of_two_metrics_get_two_figures() -> None:
    measured = scored_report([98.0, 97.0])
    measured["entries"][2]["accuracy"].update(metric="reference_top1_agreement", score=99.0)
    measured["entries"][3]["accuracy"].update(metric="reference_top1_agreement", score=99.0)
    assert [plot.name for plot in plots_of(measured, "accuracy")] == [
        "accuracy-image-classification-top1.png",
        "accuracy-image-classification-reference-top1-agreement.png",
    ]


# ------------------------------------------------------------------------------------ every


def test_every_figure_is_titled_with_what_and_where() -> None:
    measured = full_report()
    measured["settings"]["threads"] = None
    for plot in report_plots(measured):
        figure = draw(measured, plot)
        assert figure.get_suptitle() == plot.title
        assert figure.axes[0].get_title() == f"{CPU} · threads as each profile says (2)"


def test_a_dollar_in_a_name_is_not_mathtext() -> None:
    odd = hand_set("cost$1-$2", 1, [0.01] * 3)
    _, axes = drawn(report([odd]), "latency-image-classification-b1.png")
    assert axes.get_yticklabels()[0].get_text() == r"cost\$1-\$2"
