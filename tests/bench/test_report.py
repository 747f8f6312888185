"""report.json, report.md and the plots, written from synthetic schema-valid reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from reports import diffusion_entry, entry, full_report, report

from modelkiln.bench.report import ReportFiles, markdown, write_report
from modelkiln.bench.schema import read_report
from modelkiln.errors import BackendUnavailableError, ReportError

DOCUMENTS = {"report.json", "report.md", "report.html"}
# full_report's plots: one latency figure per (task, batch), the diffusion entry's stages, an
# accuracy figure per (task, metric) and a size figure per task.
PLOTS = {
    "latency": (
        "latency-image-classification-b1.png",
        "latency-image-classification-b8.png",
        "latency-text-to-image-b1.png",
    ),
    "stages": ("stages-text-to-image-b1.png",),
    "accuracy": ("accuracy-image-classification-top1.png", "accuracy-text-to-image-psnr-db.png"),
    "size": ("size-image-classification.png", "size-text-to-image.png"),
}
PLOT_NAMES = [name for names in PLOTS.values() for name in names]


def no_accuracy_report() -> dict[str, Any]:
    return report([entry(top1=None), entry(batch_size=8, median_s=0.06, top1=None)])


def rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of every markdown table row whose first cell is `first_cell`."""
    found = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0] == first_cell:
            found.append(cells)
    return found


def section(text: str, title: str) -> str:
    """One '## title' section of report.md."""
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    return write_report(full_report(), tmp_path_factory.mktemp("bench"))


# ----------------------------------------------------------------------------------- files


def test_writes_every_file_and_nothing_else(written: ReportFiles) -> None:
    outdir = written.json.parent
    assert (written.json.name, written.markdown.name, written.html.name) == (
        "report.json",
        "report.md",
        "report.html",
    )
    assert {kind: tuple(path.name for path in paths) for kind, paths in written.plots.items()} == (
        PLOTS
    )
    assert list(written.plots) == ["latency", "stages", "accuracy", "size"]
    assert {path.name for path in written.paths()} == DOCUMENTS | set(PLOT_NAMES)
    # No temporary left behind, nothing else written.
    assert {path.name for path in outdir.iterdir()} == DOCUMENTS | set(PLOT_NAMES)


@pytest.mark.parametrize("name", PLOT_NAMES)
def test_plots_are_real_images(written: ReportFiles, name: str) -> None:
    with Image.open(written.json.parent / name) as image:
        assert image.format == "PNG"
        assert image.width == 800 and image.height >= 240
        assert "Software" not in image.info
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 20, "the plot is nearly a single colour"


def test_report_json_round_trips_and_validates(written: ReportFiles) -> None:
    text = written.json.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert text.startswith('{\n  "schema": "modelkiln-bench-report"')
    assert json.loads(text) == full_report()
    assert read_report(written.json) == full_report()


def test_report_md_is_markdown_of_the_report(written: ReportFiles) -> None:
    assert written.markdown.read_text(encoding="utf-8") == markdown(full_report())


def test_report_and_plots_are_deterministic(tmp_path: Path, written: ReportFiles) -> None:
    again = write_report(full_report(), tmp_path)
    for name in [*PLOT_NAMES, "report.html"]:
        assert (tmp_path / name).read_bytes() == (written.json.parent / name).read_bytes(), name
    assert again.plots.keys() == written.plots.keys()


def test_invalid_report_raises_and_writes_nothing(tmp_path: Path) -> None:
    broken = full_report()
    del broken["entries"][0]["latency"]["p50_s"]
    outdir = tmp_path / "out"
    with pytest.raises(ReportError, match=r"entries/0/latency.*p50_s"):
        write_report(broken, outdir)
    assert not outdir.exists()


def test_a_failed_write_keeps_the_old_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "report.json").write_text("old\n", encoding="utf-8")

    def crash(self: Path, target: Path) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(Path, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_report(full_report(), tmp_path)
    assert (tmp_path / "report.json").read_text(encoding="utf-8") == "old\n"
    assert [path.name for path in tmp_path.iterdir()] == ["report.json"]


def test_plots_of_an_earlier_run_are_removed_and_other_files_kept(tmp_path: Path) -> None:
    earlier = [
        "accuracy-image-classification-top1.png",
        "latency-image-classification-b32.png",
        "stages-text-to-image-b1.png",
        # The names before plots were split by task.
        "latency.png",
        "accuracy_vs_latency.png",
        "size.png",
    ]
    kept = ["notes.png", "latency-notes.txt", "mine"]
    for name in earlier + kept:
        (tmp_path / name).write_bytes(b"from an earlier run")
    paths = write_report(no_accuracy_report(), tmp_path)
    assert set(paths.plots) == {"latency", "size"}
    names = {
        "latency-image-classification-b1.png",
        "latency-image-classification-b8.png",
        "size-image-classification.png",
    }
    assert {path.name for path in tmp_path.iterdir()} == DOCUMENTS | names | set(kept)
    text = paths.markdown.read_text(encoding="utf-8")
    assert "## Accuracy" not in text and "accuracy-" not in text
    assert "## Diffusion stages" not in text


def test_identical_images_alone_give_no_accuracy_plot(tmp_path: Path) -> None:
    # Infinite PSNR has no place on an axis; the table still says so.
    paths = write_report(report([diffusion_entry(psnr=[None, None])]), tmp_path)
    assert set(paths.plots) == {"latency", "stages", "size"}
    accuracy = section(paths.markdown.read_text(encoding="utf-8"), "Accuracy")
    [row] = rows(accuracy, "sd-openvino-int8")
    assert row[1:3] == ["psnr_db", "identical"]


def test_without_matplotlib_the_measurements_are_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.lines", "matplotlib.patches"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(BackendUnavailableError, match=r"matplotlib.*modelkiln\[bench\]"):
        write_report(full_report(), tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == {"report.json", "report.md"}


# ---------------------------------------------------------------------------------- report.md


def test_markdown_has_every_section_and_artifact() -> None:
    text = markdown(full_report())
    assert text.startswith("# modelkiln bench report\n")
    for title in (
        "Machine",
        "Settings",
        "Latency",
        "Diffusion stages",
        "Memory and size",
        "Accuracy",
    ):
        assert f"\n## {title}\n" in text
    for name in ("vit-openvino-int8", "vit-onnxruntime-fp32", "sd-openvino-int8"):
        assert f"| {name} |" in section(text, "Latency")
        assert f"| {name} |" in section(text, "Memory and size")
        assert f"| {name} |" in section(text, "Accuracy")
    assert (
        "| artifact | runtime | batch | p50 | p90 | p99 | mean ± stdev | min – max | items/s "
        "| ratio | load | first inference |" in text
    )


def test_machine_and_settings() -> None:
    text = markdown(full_report())
    machine = section(text, "Machine")
    assert "Intel(R) Xeon(R) Platinum 8480+ (2 logical cores, 2 usable)" in machine
    assert "avx512f, avx512_vnni, amx_bf16, amx_int8 (AVX-512: yes, AMX: yes)" in machine
    assert "threads used: 2 threads" in machine
    assert "onnxruntime 1.23.2, openvino 2025.3.0" in machine
    settings = section(text, "Settings")
    assert "timed runs: 20 per batch size" in settings
    assert "warmup: 3 untimed runs" in settings
    assert "batch sizes: 1, 8" in settings
    assert "isolation: each artifact in its own process" in settings
    assert "diffusion steps: 4" in settings


def test_duration_and_profile_threads() -> None:
    measured = report()
    measured["settings"].update(runs=None, duration_s=30.0, threads=None, isolate=False)
    text = markdown(measured)
    assert "timed: 30.0 s budget per batch size" in text
    assert "threads used: threads as each profile says (2)" in text
    assert "isolation: one process" in text
    assert "without isolation" in section(text, "Memory and size")


def test_latency_row_of_a_hand_set_entry() -> None:
    latency_table = section(markdown(full_report()), "Latency")
    first = rows(latency_table, "vit-openvino-int8")[0]
    assert first == [
        "vit-openvino-int8",
        "openvino",
        "1",
        "12.3 ms",  # p50 0.0123 s
        "12.5 ms",  # p90 0.01246 s
        "12.5 ms",
        "12.3 ± 0.2 ms",
        "12.1 – 12.5 ms",
        "81.3",  # 1 / 0.0123 s
        "1.00×",
        "400 ms",
        "50.0 ms",
    ]


def test_seconds_above_ten_seconds() -> None:
    [row] = rows(section(markdown(full_report()), "Latency"), "sd-openvino-int8")
    assert row[2] == "1"
    assert row[3:8] == ["12.0 s", "12.1 s", "12.1 s", "12.0 ± 0.1 s", "11.9 – 12.1 s"]
    assert row[8] == "0.083"  # images per second of a 12 s generation
    assert row[9] == "1.00×"  # its own baseline: no generation-to-classifier ratio


def test_ratio_is_relative_to_the_first_entry_at_each_batch_size() -> None:
    latency_table = section(markdown(full_report()), "Latency")
    assert [row[9] for row in rows(latency_table, "vit-openvino-int8")] == ["1.00×", "1.00×"]
    onnx = rows(latency_table, "vit-onnxruntime-fp32")
    assert onnx[0][9] == "0.50×"  # 12.3 ms against 24.6 ms: half as fast
    assert float(onnx[1][9].rstrip("×")) < 1
    assert "whatever entry of the same task comes first" in latency_table
    assert "here: vit-openvino-int8 (batch 1, 8)" in latency_table


def test_ratio_names_each_batch_sizes_own_baseline() -> None:
    measured = report(
        [
            entry("vit-onnxruntime-fp32", 8, 0.2, runtime="onnxruntime"),
            entry("vit-openvino-int8", 1, 0.01),
            entry("vit-openvino-int8", 8, 0.1),
        ]
    )
    latency_table = section(markdown(measured), "Latency")
    assert "here: vit-openvino-int8 (batch 1); vit-onnxruntime-fp32 (batch 8)" in latency_table
    assert [row[9] for row in rows(latency_table, "vit-openvino-int8")] == ["1.00×", "2.00×"]


def test_rows_follow_artifact_order_then_batch_size() -> None:
    measured = report(
        [
            entry("b-model", 8, 0.08),
            entry("a-model", 8, 0.08),
            entry("b-model", 1, 0.01),
            entry("a-model", 1, 0.01),
        ]
    )
    latency_table = section(markdown(measured), "Latency")
    order = [
        (cells[0], cells[2])
        for line in latency_table.splitlines()
        if line.startswith("| ") and (cells := line.strip("| ").split(" | "))[0].endswith("-model")
    ]
    assert order == [("b-model", "1"), ("b-model", "8"), ("a-model", "1"), ("a-model", "8")]
    assert rows(section(markdown(measured), "Memory and size"), "b-model")


def test_diffusion_stages_table() -> None:
    stages = section(markdown(full_report()), "Diffusion stages")
    assert (
        "| artifact | batch | text encoder p50 | UNet per step p50 | VAE decode p50 | images/s |"
        in stages
    )
    [row] = rows(stages, "sd-openvino-int8")
    assert row[:3] == ["sd-openvino-int8", "1", "20.0 ms"]
    assert row[4:] == ["1100 ms", "0.083"]
    assert not rows(stages, "vit-openvino-int8")


def test_memory_and_size_per_artifact() -> None:
    memory = section(markdown(full_report()), "Memory and size")
    assert "| artifact | runtime | format | peak RSS | size on disk |" in memory
    assert rows(memory, "vit-openvino-int8") == [
        ["vit-openvino-int8", "openvino", "openvino", "500 MB", "0.400 MB"]
    ]
    assert rows(memory, "sd-openvino-int8") == [
        ["sd-openvino-int8", "openvino", "openvino", "3.20 GB", "2.50 GB"]
    ]


def test_accuracy_table() -> None:
    accuracy = section(markdown(full_report()), "Accuracy")
    assert (
        "| artifact | metric | score | images | top-1 | top-5 | agreement | cosine | PSNR | SSIM |"
        in accuracy
    )
    assert rows(accuracy, "vit-openvino-int8") == [
        [
            "vit-openvino-int8",
            "top1",
            "98.50%",
            "360",
            "98.50%",
            "100.00%",
            "99.70%",
            "0.99980",
            "—",
            "—",
        ]
    ]
    assert rows(accuracy, "vit-onnxruntime-fp32")[0][1:] == ["—"] * 9
    [sd] = rows(accuracy, "sd-openvino-int8")
    assert sd[1:3] == ["psnr_db", "31.4 dB"]
    assert sd[-2:] == ["identical, 31.4 dB", "1.0000, 0.9876"]


def test_artifacts_sharing_a_name_are_told_apart_by_path() -> None:
    twin = entry()
    twin["artifact"] = "/elsewhere/vit-openvino-int8"
    text = markdown(report([entry(), twin]))
    assert rows(text, "/work/artifacts/vit-openvino-int8")
    assert rows(text, "/elsewhere/vit-openvino-int8")


def test_an_empty_report_still_renders(tmp_path: Path) -> None:
    paths = write_report(report([]), tmp_path)
    assert "No entries." in paths.markdown.read_text(encoding="utf-8")
    assert "No entries." in paths.html.read_text(encoding="utf-8")
    assert paths.plots == {}
    assert "## Plots" not in paths.markdown.read_text(encoding="utf-8")


def test_markdown_names_every_plot_and_the_html_page() -> None:
    plots = section(markdown(full_report()), "Plots")
    images = [line for line in plots.splitlines() if line.startswith("![")]
    assert [line.rsplit("(", 1)[1].rstrip(")") for line in images] == PLOT_NAMES
    assert "![image-classification · batch 8: latency per call]" in plots
    assert "![text-to-image · batch 1: latency per generation]" in plots
    assert "report.html" in plots
